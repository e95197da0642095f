"""rentahal-node: a peer-to-peer federation node for AI realms."""

__version__ = "0.1.0"
