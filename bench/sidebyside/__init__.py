"""`zoedge bench`: every contender side by side (zoedge ZO, onnxruntime inference, PyTorch MeZO, PyTorch backprop,
onnxruntime-training), each in its own process, on the same bundles, data and batches.

  python -m bench.sidebyside [--quick] [--models ...] [--only ...] [--data SST2_DIR] [--work DIR] ...

run.py plans and runs (bundles, settings, one worker process per contender), worker.py is that process,
contenders.py holds one function per contender, report.py writes the JSON, table and plots. The
onnxruntime-training contender runs ort_training_run.py in its own virtualenv (ortvenv.py, in ~/.cache/zoedge).
"""
