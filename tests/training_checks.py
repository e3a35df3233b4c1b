"""Checks the model-level tests share: two training runs agree, a patched model matches its
unpatched twin."""
import torch


def assert_losses_close(got, want, rtol):
    """Per-step losses of two `qlora.train` runs agree to rtol, relative."""
    assert len(got) == len(want)
    for (a, _, _), (b, _, _) in zip(got, want):
        assert abs(a - b) <= rtol * abs(b), (got, want)


def draw_lora_b(*models, std=0.02):
    """The same non-zero LoRA B weights in each model (PEFT starts them at 0, which
    leaves the LoRA term out of the loss and A's gradient at 0)."""
    for model in models:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def cast_adapters(model, dtype):
    """Every LoRA weight of `model` in `dtype`, in place (PEFT makes them fp32; TRL casts
    them to bf16 on 4-bit models)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)


def assert_patched_matches(model, ref, ids, labels):
    """One labelled forward + backward of a patched model and its unpatched twin, with
    LoRA B drawn non-zero in both: no logits built, same loss, same gradient for every
    trainable parameter."""
    draw_lora_b(model, ref)
    out, want = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    want.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == want_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
