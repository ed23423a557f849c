import json, math, torch, sys
sys.path.insert(0, "benchmarks")
from bench_gemm import make_layers, time_graph
from trellm.kernels.exl3_gemv import exl3_gemv
from trellm.kernels.hadamard import had_in
dev = torch.device("cuda")
for (k, n) in [(4096, 14336), (14336, 4096)]:
    for bits in (2, 4):
        layers = make_layers(k, n, bits, max(2, math.ceil(150e6 / (k * n * bits / 8))), dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        xh, xs = had_in(x, layers[0].suh)
        for ta, nw, mr, sc in [(2,4,None,2.0),(2,4,64,2.0),(2,4,80,2.0),(4,4,64,2.0),(4,8,64,1.0),(8,8,64,1.0),(2,8,64,2.0),(4,4,96,2.0),(8,8,None,1.0)]:
            try:
                t = time_graph([lambda l=l: exl3_gemv(xh, xs, l.trellis, l.svh, None, l.codebook, n, torch.bfloat16, ta=ta, num_warps=nw, maxnreg=mr, split_scale=sc) for l in layers])
            except Exception as e:
                print("fail", ta, nw, mr, str(e)[:80]); continue
            print(json.dumps({"k": k, "n": n, "bits": bits, "ta": ta, "nw": nw, "maxnreg": mr, "split": sc, "us": round(t, 2)}), flush=True)
