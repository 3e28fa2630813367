"""The reward server (Ray Serve) and its clients. `python -m engine.serve --help` starts a server.

Importing this package needs no Ray: the clients use the standard library; the server lives in `engine.serve.app`.
"""

from engine.serve.client import (
    RemoteLatentReward,
    RemoteRequestError,
    RemoteRewardError,
    ScoreClient,
    remote_reward_fn,
)
from engine.serve.wire import ServerResponseError, decode_request, decode_response, encode_request, encode_response

__all__ = [
    "RemoteLatentReward",
    "RemoteRequestError",
    "RemoteRewardError",
    "ScoreClient",
    "ServerResponseError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "remote_reward_fn",
]
