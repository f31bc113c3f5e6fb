"""Clients of the `dlm` Triton model: gRPC (blocking and asyncio) and HTTP, one `Result` type, one set of
exceptions. `python -m client` is the command line; `python -m client.gateway` the OpenAI-compatible gateway."""

from client.grpc_client import AsyncBlockStream, AsyncGrpcClient, BlockStream, GrpcClient
from client.http_client import HttpClient
from client.request import MODES, Options
from client.result import (Alternative, Block, Cancelled, DLMError, InvalidRequest, Result, ServerUnavailable,
                           Timeout, Token)

__all__ = [
    "Alternative", "AsyncBlockStream", "AsyncGrpcClient", "Block", "BlockStream", "Cancelled", "DLMError",
    "GrpcClient", "HttpClient", "InvalidRequest", "MODES", "Options", "Result", "ServerUnavailable", "Timeout",
    "Token",
]
