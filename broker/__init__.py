"""The broker: routes calls from clients to the slot that owns each object (see DESIGN §1)."""

from .ring import Ring
from .router import Broker, BrokerConfig

__all__ = ["Broker", "BrokerConfig", "Ring"]
