"""Why does the FSDP2 benchmark model give loss = ln(V) on the GPU? Parameter stats after build and after steps."""
import math, sys, torch, numpy as np
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from benchmarks.sharding import ShardingBenchConfig, build, train_config, init_process_group, synthetic_batch, SHAPES

shape = sys.argv[1]
cfg = ShardingBenchConfig(shape=shape, mode="lora", precision=(sys.argv[2] if len(sys.argv) > 2 else "auto"), steps=2, warmup_steps=1, tokens_per_gpu=1024, example_len=128)
cfg.validate()
rank, world, device = init_process_group("fsdp2")
tcfg = train_config(cfg)
engine, n, layers, hidden = build(cfg, tcfg, device, 4)
def stats(tag):
    ps = list(engine.module.named_parameters())
    for name, p in ps[:3] + [x for x in ps if "layers.0.self_attn.q_proj" in x[0]] + ps[-3:]:
        loc = p.to_local() if isinstance(p, DTensor) else p
        print(tag, name, type(p).__name__, loc.device, loc.dtype, tuple(loc.shape), "abs mean", float(loc.float().abs().mean()), flush=True)
stats("built")
vocab = SHAPES[shape]().vocab_size
b = engine.to_device(synthetic_batch(cfg, tcfg.model.num_image_tokens, vocab, np.random.default_rng(0)))
engine.train()
for i in range(3):
    out = engine.forward(b); engine.backward(out.loss); applied = engine.step()
    print("step", i, "loss", float(out.loss), "ln V", math.log(vocab), "applied", applied, flush=True)
stats("after")
dist.destroy_process_group()
