"""Cold compile time of the TTT training graph: flex doc-masked row vs dense cudnn rows (caches off)."""
import os, sys, time, torch
sys.path.insert(0, os.getcwd())
import train_gpt as tg
from pathlib import Path
from torch._dynamo.utils import compile_times
dev = torch.device("cuda")
base, meta = tg.load_artifact(Path(".testbed/eval/final_model.pgz"), tg.ModelConfig(), ("flex", "cudnn"), dev)
model = torch.compile(base, dynamic=False)
which = sys.argv[1]
x = torch.randint(0, 8192, (1, 16384) if which == "flex" else (8, 2048), device=dev)
y = torch.randint(0, 8192, x.shape, device=dev)
starts = tg.segment_starts(x, 2048) if which == "flex" else None
for i in range(3):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        nll = model(x, y, starts, looping=True)
    tf = time.perf_counter() - t
    nll.sum().backward()
    torch.cuda.synchronize()
    print(f"probe {which} call {i}: fwd {tf:.1f} s, fwd+bwd {time.perf_counter() - t:.2f} s", flush=True)
print(compile_times(repr="str", aggregate=True), flush=True)
