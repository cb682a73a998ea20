"""LQER at equal bytes (issue 3, item 3): train once, then write the artifact twice from the same
weights and Hessians, with LQER_TOP_K=0 and LQER_TOP_K=3, each fitted to the 16,000,000-byte cap by
write_artifact, and score both (flat val_bpb of the model rebuilt from the file).
Run from the repository root with the training run's environment variables, e.g.
  DATA_PATH=... TOKENIZER_PATH=... MAX_WALLCLOCK_SECONDS=130 python3 records/testbed/<this folder>/lqer_probe.py
It writes runs/<RUN_ID>/lqer{0,3}/final_model.pgz and their logs."""
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
import train_gpt as tg  # noqa: E402

t_process = time.time()
hp = tg.Hyperparameters.from_env(os.environ)
dist_env = tg.setup_distributed(os.environ)
out = Path(hp.out_dir or "runs/lqer_probe")
out.mkdir(parents=True, exist_ok=True)
log = tg.Logger(out / "train.log", dist_env.is_main)
tg.log_run_header(log, hp, dist_env)
backends = tg.resolve_backends(hp.train.attn_backend, dist_env.device)
run = tg.Run(hp, dist_env, log, out, backends, *tg.batch_geometry(hp, dist_env.world_size, backends[0]))
model, result = tg.train_model(run, None, t_process)
for k in (0, 3):
    sub = out / f"lqer{k}"
    sub.mkdir(exist_ok=True)
    q = dataclasses.replace(hp, quant=dataclasses.replace(hp.quant, lqer_top_k=k),
                            eval=dataclasses.replace(hp.eval, sliding_window_enabled=False, ttt_enabled=False))
    r = dataclasses.replace(run, hp=q, out_dir=sub)
    log.line(f"--- LQER_TOP_K={k}")
    path = tg.export_artifact(r, model, result)
    scores = tg.score_artifact(r, path)
    log.line(f"lqer_top_k={k} bytes_total={scores['bytes_total']} quant_val_bpb={scores['quant_val_bpb']:.6f}")
log.close()
