"""JSON-RPC 2.0 between `virtnet` and `virtio-net-controller`: newline-
delimited JSON over a Unix stream socket.

- vfe.rpc.protocol: sans-I/O framing and validation, error codes, RpcError
- vfe.rpc.server:   RpcServer, plugged into the daemon's selector loop
- vfe.rpc.client:   call(path, method, params) for virtnet
"""
from vfe.rpc.protocol import (  # noqa: F401
    ERR_AGAIN, ERR_BUSY, ERR_EXISTS, ERR_INVALID, ERR_IO, ERR_NO_DEVICE, ERR_NO_SPACE,
    ERR_NOT_SUPPORTED, ERR_PERM, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST,
    METHOD_NOT_FOUND, PARSE_ERROR, ErrorResponse, Request, RpcConnection, RpcError,
    encode_error, encode_request, encode_result,
)
from vfe.rpc.client import RpcClient, RpcConnectionError, call  # noqa: F401
from vfe.rpc.server import RpcServer, method_table  # noqa: F401
