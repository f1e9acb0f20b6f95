"""Packages that extend the compiler (later stages' transforms, kernels) register themselves on import; this
finds them through the `ad_compiler.plugins` entry-point group, so the compiler never names them."""

import importlib
import importlib.metadata
import os

ENTRY_POINT_GROUP = "ad_compiler.plugins"
# Module names to import as plugins, comma-separated: for packages on PYTHONPATH but not installed (no
# entry-point metadata then), e.g. AD_PLUGINS=ad_runtime on a machine that runs the sources.
PLUGINS_ENV = "AD_PLUGINS"


def load_plugins() -> list[str]:
    """Import every plugin that is installed or named in AD_PLUGINS; returns the module names imported."""
    names = [ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    names += [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    loaded = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"the compiler plugin {name!r} could not be imported: {e}") from e
        loaded.append(name)
    return loaded
