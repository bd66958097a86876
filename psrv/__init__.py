"""psrv: a parameter-server runtime for data-parallel training on CPU cores.

    summary, theta, out_dir = psrv.train("configs/default.toml", overrides=["train.workers=2"])
    model = psrv.load(out_dir); model.predict(X); model.score(X, y)
"""
import importlib

from .errors import ConfigError, DataError, ProtocolError, PsrvError, RunError

__version__ = "0.1.0"
__all__ = ["train", "load", "Model", "Result", "Config", "load_config", "PsrvError", "ConfigError", "DataError",
           "RunError", "ProtocolError", "__version__"]

# The public names that live in heavier modules, imported on first use (PEP 562): every server and worker process
# imports this package (to reach psrv.proc, psrv.server, ...), and importing the launcher here would cost each of
# them its modules (the live view's http.server, the cluster, ...) at start-up.
_LAZY = {"train": ("launch", "train"), "Result": ("launch", "Result"), "load": ("model", "load"),
         "Model": ("model", "Model"), "Config": ("config", "Config"), "load_config": ("config", "load")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'psrv' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
