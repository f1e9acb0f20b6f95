"""Where registry entries come from: the compiler's built-ins (named here and nowhere else) and the packages that
extend it (later stages' transforms, kernels, backends), found through the `ad_compiler.plugins` entry-point
group so that the compiler never names them. Every module registers its entries when imported."""

import importlib
import importlib.metadata
import logging
import os
import pkgutil

from ad_config.dynamic_yaml import PLUGINS_ENV

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ad_compiler.plugins"
# PLUGINS_ENV (AD_PLUGINS): module names to import as plugins, comma-separated: for packages on PYTHONPATH but not
# installed (no entry-point metadata then), e.g. AD_PLUGINS=ad_runtime on a machine that runs the sources.


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


# The compiler's own providers, each package with all its modules: canonical ops, torch kernel backends, transforms,
# model factories, export patches (one module a patch, which their registry's module must not import).
_BUILTINS = ("ad_compiler.custom_ops", "ad_compiler.kernels_registry", "ad_compiler.transform.library",
             "ad_compiler.models.hf", "ad_compiler.export.patches")
_state = {"loaded": False}


def load_builtins_and_plugins() -> None:
    """Import the built-in providers and every plugin, once (registries call this before a lookup)."""
    if _state["loaded"]:
        return
    _state["loaded"] = True  # first: a plugin that looks something up while it imports must not re-enter
    for name in _BUILTINS:
        for m in pkgutil.iter_modules(getattr(importlib.import_module(name), "__path__", [])):
            importlib.import_module(f"{name}.{m.name}")
    try:
        load_plugins()
    except ImportError as e:
        # The compiler's own stages still work; a lookup of what the plugin provides fails with its name.
        logger.warning("%s", e)
