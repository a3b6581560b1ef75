"""Flower interop (`pip install zoedge[flower]`): zoedge devices in a Flower fleet (flwr 1.4x Message API).

client_app.py is the ClientApp (a device: zoedge.runtime, numpy + onnxruntime, no torch), server_app.py the
ServerApp, strategy.py its two strategies (seed-pool ZO and adapter FedAvg), records.py what travels in Flower's
records. The Flower app that points at them is apps/flower/pyproject.toml; docs/fleet.md says how to run it.
"""
