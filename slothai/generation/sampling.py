"""The choice of each next token as tensor operations over a session's buffers: no
host read, no shape that depends on the data, so a decode step can be compiled whole
and recorded as a CUDA graph.

`Sampler.build` reads the logits processors and stopping criteria that transformers'
own `generate` builds for the call (its `_get_logits_processor` /
`_get_stopping_criteria`), so the options it applies, their order and their values
are transformers' for that release; it refuses (with the reason, and `generate` then
runs transformers' own) any it does not know. The processors whose state is Python
numbers (temperature, top-k, top-p, min-p, removing inf/NaN) are transformers' own
objects, called as they are; those that read the sequence so far are computed here
over the session's fixed-size buffers:

- repetition penalty: transformers' gather / scatter over every token id so far,
  with the slots not yet written (and, where that release leaves them out, the
  prompt's left padding) pointed at one extra column that is dropped after;
- minimum length / minimum new tokens: the EOS ids' scores set to -inf while the
  sequence (or the part of it after the prompt) is shorter, the length a tensor.

Then, as transformers' `_sample`: argmax (greedy) or `torch.multinomial(softmax(scores),
1)` (which torch computes as argmax(p / E), E ~ Exp(1), checking the probabilities
asynchronously: no host synchronisation), a finished row's token replaced by the pad
id, and a row finishes at an EOS id. On the CPU a seed then draws what transformers
draws from the same scores; under a CUDA graph the random stream advances per replay,
so the draws differ from transformers' eager ones, from the same distribution.
"""
import numbers

import torch
import torch.nn.functional as F

# transformers' processors whose state is Python numbers: called as they are.
STATELESS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
             "InfNanRemoveLogitsProcessor")


def _scalars(processor):
    """The processor's attributes, when every one is a Python number, bool, str or None."""
    items = sorted(vars(processor).items())
    if all(v is None or isinstance(v, (numbers.Number, str)) for _, v in items):
        return tuple(items)
    return None


def _ids_of(tensor_or_ints):
    if tensor_or_ints is None:
        return ()
    if isinstance(tensor_or_ints, torch.Tensor):
        return tuple(int(i) for i in tensor_or_ints.flatten().tolist())
    if isinstance(tensor_or_ints, numbers.Integral):
        return (int(tensor_or_ints),)
    return tuple(int(i) for i in tensor_or_ints)


class Sampler:
    """The next-token rule of one `generate` call; `key` identifies what a recorded
    graph bakes in (processor kinds and values, EOS and pad ids, what is copied out)."""

    def __init__(self, steps, key, do_sample, eos, has_eos, pad, vocab, device, want_scores, want_logits):
        self.steps, self.do_sample, self.pad, self.has_eos = steps, do_sample, pad, has_eos
        self.want_scores, self.want_logits = want_scores, want_logits
        # device tensors made here, never inside a step (a copy from the host there would
        # synchronise, and a CUDA graph would keep the address of a freed one)
        self.eos = torch.tensor(list(eos) or [-1], dtype=torch.long, device=device)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        for i in eos:
            if 0 <= i < vocab:
                self.eos_mask[i] = True
        self.key = (key, do_sample, tuple(eos), has_eos, pad, want_scores, want_logits)
        self.ignore = None  # how the repetition penalty leaves out leading tokens: see _penalty

    @classmethod
    def build(cls, processors, criteria, config, vocab, device, want_scores, want_logits):
        """(Sampler, None), or (None, what it does not cover)."""
        eos = _ids_of(getattr(config, "_eos_token_tensor", None))
        steps, key, ignore = [], [], None
        for p in processors:
            name = type(p).__name__
            if name in STATELESS and _scalars(p) is not None:
                steps.append(p)
                key.append((name, _scalars(p)))
            elif name == "RepetitionPenaltyLogitsProcessor" and set(vars(p)) <= {
                    "penalty", "prompt_ignore_length", "logits_indices", "cu_seq_lens_q"} and \
                    getattr(p, "logits_indices", None) is None and getattr(p, "cu_seq_lens_q", None) is None:
                skip = getattr(p, "prompt_ignore_length", None)
                ignore = "padding" if isinstance(skip, torch.Tensor) else int(skip or 0)
                steps.append(_penalty(float(p.penalty)))
                key.append((name, float(p.penalty), ignore))
            elif name == "MinLengthLogitsProcessor":
                steps.append(_min_length(int(p.min_length), None))
                key.append((name, int(p.min_length), _ids_of(p.eos_token_id)))
            elif name == "MinNewTokensLengthLogitsProcessor":
                steps.append(_min_length(int(p.min_new_tokens), "new"))
                key.append((name, int(p.min_new_tokens), _ids_of(p.eos_token_id)))
            else:
                return None, f"logits processor {name}"
        for c in criteria:
            name = type(c).__name__
            if name == "EosTokenCriteria":
                if not eos or set(_ids_of(c.eos_token_id)) != set(eos):
                    return None, "an EOS stopping criterion other than the generation config's EOS ids"
            elif name != "MaxLengthCriteria":
                return None, f"stopping criterion {name}"
        has_eos = any(hasattr(c, "eos_token_id") for c in criteria)
        pad = _ids_of(getattr(config, "_pad_token_tensor", None))
        if has_eos and not pad:
            return None, "EOS ids without a pad id"
        for k in key:  # the min-length rules suppress the EOS ids they were given: the config's
            if k[0] in ("MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor") and set(k[2]) != set(eos):
                return None, f"{k[0]} with EOS ids other than the generation config's"
        sampler = cls(steps, tuple(key), bool(config.do_sample), eos, has_eos, pad[0] if pad else 0, vocab, device,
                      want_scores, want_logits)
        sampler.ignore = ignore
        return sampler, None

    def advance(self, s, logits):
        """Choose the token at slot `s.cur + 1` of every row from `logits` [rows, vocab]
        and advance the session: write it (ids, next_ids), move `cur` and the position
        ids on by one, mark rows that reached an EOS id."""
        scores = logits.float()
        n = s.cur + 1
        if self.want_logits:
            s.logits.copy_(scores)
        for step in self.steps:
            scores = step(s.ids, scores) if not callable(getattr(step, "session_step", None)) else \
                step.session_step(s, scores, n, self)
        if self.want_scores:
            s.scores.copy_(scores)
        if self.do_sample:
            # one sample without replacement: torch draws it as argmax(p / E), E ~ Exp(1),
            # with asynchronous checks — no host synchronisation, capturable
            token = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        if self.has_eos:
            token = torch.where(s.unfinished, token, self.pad)
        s.ids.index_copy_(1, n.view(1), token[:, None])
        s.next_ids.copy_(token[:, None])
        if self.has_eos:
            # (not torch.isin: with ten or more ids it sorts and takes unique values, a
            # data-dependent size that would synchronise)
            at_eos = (token[:, None] == self.eos[None, :]).any(-1)
            s.finish_at.copy_(torch.where(at_eos & s.unfinished, n, s.finish_at))
            s.unfinished.logical_and_(~at_eos)
        s.cur.add_(1)
        s.position.add_(1)


class _SessionStep:
    """A processing step that reads the session (the sequence so far, its length)."""

    def __init__(self, fn):
        self.session_step = fn


def _penalty(penalty):
    def step(s, scores, n, sampler):
        vocab = scores.shape[-1]
        seen = (s.slots[None, :] < n) & (s.slots[None, :] >= s.ignore[:, None])
        ids = s.ids.clamp(max=vocab).masked_fill(~seen, vocab)
        padded = F.pad(scores, (0, 1))
        score = torch.gather(padded, 1, ids)
        score = torch.where(score < 0, score * penalty, score / penalty)
        return padded.scatter(1, ids, score)[..., :vocab]
    return _SessionStep(step)


def _min_length(length, counted):
    def step(s, scores, n, sampler):
        short = (n - s.prompt_length if counted == "new" else n) < length
        return scores.masked_fill(sampler.eos_mask & short, -float("inf"))
    return _SessionStep(step)
