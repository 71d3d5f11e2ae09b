"""The converter's sources, one module each (source.py says what a source defines).

SOURCES is the one table `python -m mmcmae_jax.data.convert` reads: a new source is a module of this
package defining SOURCE, and its entry here.
"""

from mmcmae_jax.data.sources import folder, nyu_mat, procedural, scannet, sunrgbd, tum
from mmcmae_jax.data.sources.source import Source

# In the order `convert --help` lists them.
SOURCES: dict[str, Source] = {
    s.name: s
    for s in (folder.SOURCE, nyu_mat.SOURCE, sunrgbd.SOURCE, scannet.SOURCE, tum.SOURCE, procedural.SOURCE)
}
