"""Which task, model and head a command uses on a run it did not start: those the run recorded in its
config.json (read by workdir.read_config), except a field given on the command line, which wins.

The evaluation command builds the fine-tuned model from a config file, whose model and head are the
file's defaults, not the run's: a 64 px model evaluated at the file's 224 px gives other numbers without
a word. So the run's record decides, and each field keeps where it came from, for the terminal line and
the results.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field as dataclass_field
from typing import Iterable

from mmcmae_jax.errors import ConfigError
from mmcmae_jax.run.mismatch import recorded_field, shape_fields
from mmcmae_jax.run.workdir import config_path, read_config

# The fields of a fine-tuning config that say what its checkpoint is: the task and its labels, the
# encoder, the head. Evaluation options (eval_data, eval.*) stay the config file's and the flags'.
RUN_FIELDS = ("task", "num_classes", "class_names", "ignore_label", "label_remap", "model", "head")

_SHOWN = 6  # fields named in one notice line before "and N more"


@dataclass
class Resolution:
    """Where each run field of a config came from. Fields are dotted ("model.image_size")."""
    config_json: str | None                                # the record read, None when there is none
    unreadable: str = ""                                   # why the record could not be used
    from_record: list = dataclass_field(default_factory=list)   # taken from config.json
    given: dict = dataclass_field(default_factory=dict)          # set on the command line: value
    conflicts: dict = dataclass_field(default_factory=dict)      # given and unlike the record: (given, recorded)
    replaced: dict = dataclass_field(default_factory=dict)       # the config file's value, not used: (file, recorded)
    from_file: list = dataclass_field(default_factory=list)      # not in the record: the config file's

    def source(self) -> str:
        """Where the task, model and head came from, in a few words."""
        if not self.config_json or not self.from_record:
            why = self.unreadable or f"no {os.path.basename(self.config_json or 'config.json')} in the work directory"
            return f"task, model and head from the config file ({why})"
        text = f"task, model and head from {self.config_json}"
        if self.given:
            text += " except " + ", ".join(_flag(f, v) for f, v in self.given.items())
        return text

    def notices(self) -> list:
        """One line for the flags that overrule the record, one for the config file's values it replaced."""
        lines = []
        if self.conflicts:
            lines.append(f"notice: the command line overrules {self.config_json}: " + _listed(
                [f"{_flag(f, given)} (the run's: {_short(recorded)})" for f, (given, recorded) in self.conflicts.items()]))
        if self.replaced:
            lines.append(f"notice: {self.config_json}, not the config file, gives " + _listed(
                [f"{f}={_short(recorded)} (file: {_short(ours)})" for f, (ours, recorded) in self.replaced.items()]))
        if self.unreadable:
            lines.append(f"notice: {self.unreadable}; task, model and head are the config file's")
        return lines

    def as_json(self) -> dict:
        return {"config_json": self.config_json, "from_config_json": self.from_record,
                "from_command_line": {f: _plain(v) for f, v in self.given.items()},
                "overruled": {f: {"given": _plain(g), "recorded": r} for f, (g, r) in self.conflicts.items()},
                "from_config_file": self.from_file, "unreadable": self.unreadable or None}


def take_run_fields(config, workdir: str, given: Iterable[str]) -> Resolution:
    """Set the task, model and head fields of the fine-tuning `config` to those the run in `workdir`
    recorded, except the fields in `given` (set on the command line), which win. A given field that
    the checkpoint's parameter shapes depend on and that differs from the record is a ConfigError:
    the checkpoint cannot be restored into that model."""
    given = set(given)
    file = config_path(workdir)
    try:
        recorded = read_config(workdir)
    except ValueError as err:  # evaluated with the config file's fields, said so
        return Resolution(file, unreadable=str(err), from_file=_run_fields(config))
    if recorded is None:
        return Resolution(None, from_file=_run_fields(config))
    resolution = Resolution(file)
    for name in _run_fields(config):
        ours, theirs = _plain(_value(config, name)), recorded_field(recorded, name)
        if name in given:
            resolution.given[name] = _value(config, name)
            if theirs is not None and theirs != ours:
                resolution.conflicts[name] = (_value(config, name), theirs)
        elif theirs is None:
            resolution.from_file.append(name)
        else:
            resolution.from_record.append(name)
            if theirs != ours:
                resolution.replaced[name] = (ours, theirs)
                _set(config, name, theirs, file)
    pos_embed = recorded_field(recorded, "model.pos_embed")
    refused = [f for f in ("task", *shape_fields(config.task, pos_embed)) if f in resolution.conflicts]
    if refused:
        flags = " ".join(_flag(f, resolution.conflicts[f][0]) for f in refused)
        runs = ", ".join(f"{f}={_short(resolution.conflicts[f][1])}" for f in refused)
        raise ConfigError(f"{flags}: {file} records {runs}, and the checkpoint was trained as that model; "
                          f"drop the flag to evaluate it as it was trained")
    return resolution


def _run_fields(config) -> list:
    """The dotted names of the RUN_FIELDS leaves that `config` has."""
    names = []
    for top in RUN_FIELDS:
        if top not in config:
            continue
        if hasattr(config[top], "keys"):
            names += [f"{top}.{key}" for key in config[top].keys()]
        else:
            names.append(top)
    return names


def _value(config, name: str):
    value = config
    for key in name.split("."):
        value = value[key]
    return value


def _set(config, name: str, value, file: str) -> None:
    *parents, key = name.split(".")
    holder = config
    for part in parents:
        holder = holder[part]
    if isinstance(holder[key], tuple) and isinstance(value, list):  # JSON has no tuples
        value = tuple(value)
    try:
        holder[key] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{file}: {name}={value!r} does not fit the config's field ({err})") from None


def _plain(value):
    """A config value as config.json records it (tuples as lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _short(value, limit: int = 40) -> str:
    text = repr(_plain(value))
    return text if len(text) <= limit else text[:limit - 4] + " ..."


def _flag(name: str, value) -> str:
    return f"--config.{name}={_short(value)}"


def _listed(items: list) -> str:
    text = ", ".join(items[:_SHOWN])
    return text + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
