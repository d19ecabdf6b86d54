"""The remote-code files that an ``hf`` emission ships beside a model whose layers differ in
width, so that stock transformers loads it with ``trust_remote_code=True`` and no lorashear.

``configuration_lorashear.py`` and ``modeling_lorashear.py`` are copied verbatim into the
output directory and registered through ``auto_map`` in its ``config.json``; they import only
torch and transformers (``tests/runtime/test_hf_remote_code.py`` loads them with lorashear
unimportable). Nothing in lorashear imports this package except :mod:`lorashear.runtime.hf`,
which checks the files' model against the weights before it writes them.
"""

from pathlib import Path

#: The files an emission copies, from this folder.
REMOTE_CODE_FILES = ("configuration_lorashear.py", "modeling_lorashear.py")
FOLDER = Path(__file__).parent
