"""Flower engine for FedKSeed and the FedIT / FedAvg baselines (optional extra:
``pip install 'fedkseed[flower]'``).

Thin Flower shells over the transport-free ``fedkseed.fed.Server`` / ``Client`` (FedKSeed:
wire-format bytes in a ConfigRecord, the ArrayRecord empty) and ``fed.firstorder`` (FedIT,
FedAvg: their tensors in an ArrayRecord):

    protocol.py     message keys, the run config and the engine's own options
    payloads.py     how each method's messages ride in records (FedKSeed: wire bytes in a
                    ConfigRecord; FedIT/FedAvg: tensors in an ArrayRecord)
    strategy.py     FedKSeedStrategy (flwr.serverapp.strategy.Strategy) over Server
    identity.py     NodeKeys: node public keys -> client ids (the deployment's node-keys list)
    server_app.py   serve() (the round loop) and the deployable ServerApp ``app``
    client_app.py   the ClientApp ``app`` over Client
    engine.py       run_flower(): ``fedkseed simulate --engine flower`` (simulation runtime, Ray)
    app/            the Flower App config (pyproject.toml) for ``flwr run`` on a SuperLink

``import fedkseed`` never imports this package (nor flwr). See docs/flower.md.
"""
