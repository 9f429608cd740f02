"""Wire schema of medserve: the Open Inference Protocol (KServe V2) gRPC service with Triton's extensions.

``grpc_service.proto`` and ``model_config.proto`` are the source; ``*_pb2.py``, ``*_pb2_grpc.py`` and
their ``.pyi`` stubs are generated from them at build time by ``generate.py`` (never edited, never
committed). ``wire`` holds the datatype table and raw tensor encoding shared by server and client.
"""
