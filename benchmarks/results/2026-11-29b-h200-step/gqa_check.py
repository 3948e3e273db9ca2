"""torch 2.11 varlen_attn: can K/V keep their 8 heads (native GQA) instead of repeat_interleave to 32?"""
import inspect, time, torch
from torch.nn.attention import varlen
print("torch", torch.__version__, "varlen_attn params:", list(inspect.signature(varlen.varlen_attn).parameters))
torch.manual_seed(0)
T, Hq, Hk, D = 4096, 32, 8, 128
lens = [256] * 16
cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
q = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16)
def rep(q, k, v):
    return varlen.varlen_attn(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), cu, cu, 256, 256, window_size=(-1, 0))
def native_public(q, k, v):
    return varlen.varlen_attn(q, k, v, cu, cu, 256, 256, window_size=(-1, 0))
print(torch.ops.torch_attn._varlen_attn.default._schema)
ARGS = [a.name for a in torch.ops.torch_attn._varlen_attn.default._schema.arguments]
def native_private(q, k, v):
    kw = {"is_causal": True} if "is_causal" in ARGS else {"window_size": [-1, 0]}
    return torch.ops.torch_attn._varlen_attn(q, k, v, cu, cu, 256, 256, **kw)[0]
ref = rep(q, k, v); ref.backward(g); gref = [t.grad.clone() for t in (q, k, v)]
for name, fn in (("public", native_public), ("private", native_private)):
    for t in (q, k, v): t.grad = None
    try:
        out = fn(q, k, v); out.backward(g)
        d = [(out - ref).abs().max().item()] + [(t.grad - r).abs().max().item() for t, r in zip((q, k, v), gref)]
        print(name, "OK max |diff| out,dq,dk,dv:", d)
        for f, lab in ((rep, "repeat"), (fn, name)):
            for _ in range(3): f(q, k, v).backward(g)
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(20): f(q, k, v).backward(g)
            torch.cuda.synchronize(); print(f"  {lab}: {(time.perf_counter()-t0)/20*1e3:.3f} ms fwd+bwd")
    except Exception as e:
        print(name, "FAILED:", type(e).__name__, str(e)[:300])
