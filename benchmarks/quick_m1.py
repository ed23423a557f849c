"""Quick m = 1 layer timing (had_in + decode-GEMV, CUDA graphs) with a reference check."""
import json, math, torch, sys
sys.path.insert(0, "benchmarks")
from bench_gemm import make_layers, time_graph, check
from trellm.kernels.exl3_dispatch import exl3_matmul
dev = torch.device("cuda")
for (k, n) in [(4096, 14336), (4096, 4096)]:
    for bits in (2, 4, 8):
        layers = make_layers(k, n, bits, max(2, math.ceil(150e6 / (k * n * bits / 8))), dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        err = check(layers[0], 1, dev)
        t = time_graph([lambda l=l: exl3_matmul(x, l) for l in layers])
        print(json.dumps({"k": k, "n": n, "bits": bits, "layer_us_graph": round(t, 2), "err": round(err, 5)}), flush=True)
