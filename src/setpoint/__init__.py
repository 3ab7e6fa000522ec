"""setpoint: an OpenAI-compatible LLM gateway and control plane."""

from setpoint.clock import Clock, ManualClock, RealClock
from setpoint.config.compile import Runtime, compile_config
from setpoint.config.load import load_config, parse_config
from setpoint.errors import ConfigError, SetpointError
from setpoint.proxy.background import BackgroundGateway
from setpoint.types import Provider, Reply, Stage, UpstreamCall, Usage

__all__ = [
    "BackgroundGateway",
    "Clock",
    "ConfigError",
    "ManualClock",
    "Provider",
    "RealClock",
    "Reply",
    "Runtime",
    "SetpointError",
    "Stage",
    "UpstreamCall",
    "Usage",
    "compile_config",
    "load_config",
    "parse_config",
]

__version__ = "0.1.0"
