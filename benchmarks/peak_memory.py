"""Run a Python module or script as ``__main__``, then write its peak memory
as JSON: the process's own peak RSS and, when it used CUDA, torch's peak
allocated and reserved GPU memory (the caching allocator's; the CUDA
context, about 0.5 GB, is not in either).

    python benchmarks/peak_memory.py OUT.json -m lorabooth train ...
    python benchmarks/peak_memory.py OUT.json train_dreambooth_lora.py ...

Both trainers run under this same wrapper, so their GPU peaks are read the
same way; it is plain Python, so it runs in the reference's own venv too.
"""

from __future__ import annotations

import atexit
import json
import resource
import runpy
import sys
from pathlib import Path


def _write(path: str) -> None:
    data = {"peak_rss_gb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    torch = sys.modules.get("torch")  # a run that never imported torch used no GPU
    if torch is not None:
        data["torch"] = torch.__version__  # this environment's build, not the caller's
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        data["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        data["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        data["gpu"] = torch.cuda.get_device_name()
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: peak_memory.py OUT.json (-m MODULE | SCRIPT) [ARGS...]")
    out, rest = sys.argv[1], sys.argv[2:]
    atexit.register(_write, out)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, str(Path(rest[0]).resolve().parent))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
