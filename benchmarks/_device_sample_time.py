"""Time the artifacts' `sample` alone: many calls queued back to back (GPU-bound), per setting."""
import sys, time, json
import numpy as np
import torch  # noqa: F401
sys.path.insert(0, ".")
from benchmarks.e2e import _engine_ab
res = {}
for art in sys.argv[1:]:
    eng = _engine_ab(art)
    V = eng.vocab
    nargs = len(eng.manifest.functions["sample"]["inputs"])
    x = eng.to_device((np.random.default_rng(0).standard_normal(V) * 3).astype(np.float32).reshape(1, 1, V))
    r = eng.to_device(np.array([1, 0], np.int32))
    sd = eng.to_device(np.zeros(V, np.int32))
    for name, cfg in {"T0.7": [0.7, 1.0, 0, 1.0], "top_k50": [0.7, 1.0, 50, 1.0], "top_p0.9": [0.7, 0.9, 0, 1.0],
                      "k40p0.95": [0.7, 0.95, 40, 1.0], "rep1.3": [0.7, 0.95, 40, 1.3]}.items():
        if nargs == 3 and cfg[3] != 1.0:
            continue
        c = eng.to_device(np.array(cfg if nargs == 4 else cfg[:3] + [0], np.float32))
        call = (lambda: eng.fn["sample"](x, c, r, sd)) if nargs == 4 else (lambda: eng.fn["sample"](x, c, r))
        for _ in range(50):
            call()
        eng.sync()
        best = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(1000):
                call()
            eng.sync()
            best.append((time.perf_counter() - t) / 1000 * 1e6)
        res.setdefault(art, {})[name] = min(best)
        print(art, name, round(min(best), 1), "us/call", flush=True)
print(json.dumps(res))
