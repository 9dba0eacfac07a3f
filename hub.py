"""The Hugging Face hub, offline first: tell quickly and quietly whether it can be reached.

Without network, transformers and datasets retry a hub name for about 20 seconds and print a
warning per retry; the CLI instead answers in one line that a local file is needed.
"""

import os
import socket
from urllib.parse import urlparse


def reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host name does not resolve."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False
