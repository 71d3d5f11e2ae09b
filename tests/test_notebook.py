"""The Colab notebook cannot rot: it is executed top to bottom, headless, in its few-steps mode
(MMCMAE_NOTEBOOK_FAST=1), and the committed file carries no outputs.

Needs nbclient, nbformat and ipykernel (skipped without them). About 3 minutes on 2 CPU cores: marked slow."""
import base64
import json
import os
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "m3_demo.ipynb")
CELL_TIMEOUT_S = 300

# Run after the fine-tuning figure: each drawn frame's AbsRel through the evaluation's own jitted step
# (a batch weighted to that frame alone), to compare with the AbsRel the figure shows.
FIGURE_CHECK_CELL = """
from mmcmae_jax.transfer.evaluation import EVAL_FIELDS, make_eval_step
eval_step = make_eval_step(ft_config)
evaluated = []
for i in range(len(eval_batch["rgb"])):
    weight = np.zeros(len(eval_batch["rgb"]), np.float32)
    weight[i] = 1.0
    sums = jax.device_get(eval_step(ft_params, {k: host_batch[k] for k in EVAL_FIELDS}, weight))
    evaluated.append(metrics.depth_metrics(sums)["abs_rel"])
print("FIGURE CHECK", json.dumps({"figure": FIGURE_ABS_REL, "evaluation": evaluated}))
"""


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    nb = read_notebook()
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code_cells):
        assert cell.outputs == [], f"code cell {i} carries outputs: clear them before committing"
        assert cell.execution_count is None, f"code cell {i} has an execution count"
    first = code_cells[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert 'os.environ.get("MMCMAE_NOTEBOOK_FAST", "0") == "1"' in first.source
    # The install cell must not reinstall over an importable package (CI, a local checkout).
    assert any('find_spec("mmcmae_jax") is None' in c.source and "pip" in c.source for c in code_cells)


def run_parameters_cell(monkeypatch, fast: bool):
    """The first cell, run as a user runs it from a checkout: the namespace it leaves and what it prints."""
    cell = next(c for c in read_notebook().cells if c.cell_type == "code")
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MMCMAE_NOTEBOOK_WORKDIR", raising=False)
    monkeypatch.setenv("MMCMAE_NOTEBOOK_FAST", "1" if fast else "0")
    namespace = {}
    exec(cell.source, namespace)
    return namespace


def test_default_work_directory_lies_outside_the_checkout(monkeypatch):
    workdir = os.path.realpath(run_parameters_cell(monkeypatch, fast=False)["WORKDIR"])
    root = os.path.realpath(ROOT)
    assert os.path.commonpath([workdir, root]) != root, f"{workdir} lies inside the checkout {root}"


def test_fast_mode_says_that_its_numbers_are_not_results(monkeypatch, capsys):
    run_parameters_cell(monkeypatch, fast=True)
    assert "NOT results" in capsys.readouterr().out
    run_parameters_cell(monkeypatch, fast=False)
    assert "NOT results" not in capsys.readouterr().out


def images(nb):
    return [base64.b64decode(o.data["image/png"]) for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if "data" in o and "image/png" in o.data]


def stdout(nb):
    return "".join(o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_in_fast_mode(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    monkeypatch.setenv("MMCMAE_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MMCMAE_NOTEBOOK_WORKDIR", str(workdir))
    # The kernel is `python3` run as `python`: make that this interpreter, whose environment has the package.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    nb = read_notebook()
    figure = next(i for i, c in enumerate(nb.cells) if "FIGURE_ABS_REL" in c.source)
    nb.cells.insert(figure + 1, nbformat.v4.new_code_cell(FIGURE_CHECK_CELL))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    finally:
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept for a look when it fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = stdout(nb)
    assert "FAST=True" in text

    # Every figure was drawn: the frames, the loss curves, stage 2's pictures, the depth predictions.
    pngs = images(nb)
    assert len(pngs) >= 4
    assert all(png.startswith(b"\x89PNG") and len(png) > 5_000 for png in pngs)

    # Both pre-training stages ran their few steps and left checkpoints, metrics and the trainer's pictures.
    for stage in ("stage1", "stage2"):
        lines = (workdir / "pretrain" / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 3
        assert (workdir / "pretrain" / stage / "checkpoints").is_dir()
    assert list((workdir / "pretrain" / "stage2" / "images").glob("step_*.png"))
    assert "stage2 finished at step 3" in text

    # Fine-tuning evaluated its final step on the evaluation rooms, with finite metrics.
    results = json.loads((workdir / "finetune_depth" / "eval" / "step_3.json").read_text())
    assert results["task"] == "depth" and results["frames"] == 8
    assert all(np.isfinite(results["metrics"][k]) for k in ("delta1", "abs_rel", "rmse"))
    assert "abs_rel" in text
    # The AbsRel the figure shows for each frame is the evaluation's (predictions clipped to its depth caps).
    check = json.loads(text.split("FIGURE CHECK ")[1].splitlines()[0])
    np.testing.assert_allclose(check["figure"], check["evaluation"], rtol=1e-4)
    # Fast mode says, where its numbers are printed, that they are not results.
    assert text.count("NOT results") == 2

    # The exported RGB encoder is a timm-layout safetensors file of the pre-trained encoder.
    from safetensors.numpy import load_file
    state_dict = load_file(str(workdir / "export" / "m3_rgb_encoder.safetensors"))
    assert state_dict["patch_embed.proj.weight"].shape == (64, 3, 8, 8)  # configs/demo.py:smoke: 64x2x2/8
    assert "blocks.1.mlp.fc2.weight" in state_dict and "blocks.2.mlp.fc2.weight" not in state_dict
    assert "timm model: timm.models.vision_transformer.VisionTransformer(img_size=64" in text
    # With PyTorch and timm importable (CI installs them) the notebook compares tokens; else it says it skipped.
    try:
        from mmcmae_jax.port.timm_import import import_timm
        import_timm()
        assert "largest difference from the JAX encoder" in text
    except ImportError:
        assert "skipping the timm check" in text
