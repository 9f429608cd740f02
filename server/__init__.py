"""medserve server: a model repository of ONNX models served over the Open Inference Protocol.

Module map (imports point inward; only `service.py`, `model_config.py`, `codec.py` and `app.py`
touch protobuf types):

    cli.py               the `medserve` command
    app.py               wiring: builds the objects, starts the gRPC server, health, reflection
    workers.py           `--workers N`: server processes sharing one port (SO_REUSEPORT)
    service.py           GRPCInferenceService servicer: protobuf <-> domain, errors -> status
    codec.py             ModelInferRequest/Response <-> numpy (pure functions)
    auth.py              bearer tokens -> UNAUTHENTICATED / PERMISSION_DENIED
    metrics.py           Prometheus metrics read from the statistics at scrape time
    inference.py         InferenceCore: resolve model version, validate, batch, collect stats
    signature.py         a version's inputs/outputs, computed once; request validation
    repository.py        the served versions' states (load, reload, drain, unload) and lookup
    loader.py            a version's files on disk, checked once (model, config, card, tokenizer)
    wiring.py            the factory that makes a checked version whole (sessions, batcher, explainer)
    model_config.py      config.pbtxt <-> frozen ModelConfig (and completion from the ONNX graph)
    config.py            frozen configuration dataclasses
    batching.py          dynamic batcher: pure policy + asyncio driver (numpy only)
    runtime.py           onnxruntime sessions and execution-provider selection
    stats.py             per model-version statistics
    errors.py            domain error tree (no grpc)
"""
