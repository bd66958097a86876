"""psrv: a parameter-server runtime for data-parallel training on CPU cores.

    summary, theta, out_dir = psrv.train("configs/default.toml", overrides=["train.workers=2"])
    model = psrv.load(out_dir); model.predict(X); model.score(X, y)
"""
from .config import Config, load as load_config
from .errors import ConfigError, DataError, ProtocolError, PsrvError, RunError
from .launch import Result, train
from .model import Model, load

__version__ = "0.1.0"
__all__ = ["train", "load", "Model", "Result", "Config", "load_config", "PsrvError", "ConfigError", "DataError",
           "RunError", "ProtocolError", "__version__"]
