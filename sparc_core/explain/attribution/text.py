"""Per-word attribution of a caption for a target (``attribute_text``), through the CLIP text tower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...encoders import ClipTextEncoder, FeatureEncoder
from ...encoders.clip import budget_text
from ...model import SparcModel
from .hooks import _clip_attention, _input_grads, _Recorder
from .targets import TEXT_METHODS, AttributionError, Target, text_target


@dataclass
class WordScores:
    words: list[str]
    scores: list[float]  # signed, divided by the largest magnitude
    method: str
    target: Target

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "words": [{"word": w, "score": round(s, 6)} for w, s in zip(self.words, self.scores)],
            "latents": [{"latent": i, "weight": w} for i, w in zip(self.target.latents, self.target.weights)],
        }


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each BPE token as text, ending in a space where a word ends."""
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    out = []
    for t in ids:
        if isinstance(decoder, dict) and byte_decoder is not None and t in decoder:
            s = decoder[t]
            s = bytearray(byte_decoder.get(c, ord("?")) for c in s).decode("utf-8", errors="replace")
            out.append(s.replace("</w>", " "))
        else:  # a Hugging Face tokenizer: one piece per token, word starts marked by a space or "Ġ"/"▁"
            s = tokenizer.tokenizer.decode([t]) if hasattr(tokenizer, "tokenizer") else str(t)
            out.append(s)
    return out


def _align_to_caption(text: str, pieces: list[str], scores: list[float]) -> tuple[list[str], list[float]] | None:
    """Pieces grouped by the caption's own (whitespace) words, when they spell them out; else None."""
    words, out = text.split(), []
    i = 0
    for w in words:
        target, acc, s = w.lower().replace(" ", ""), "", 0.0
        while i < len(pieces) and len(acc) < len(target):
            acc += pieces[i].strip().lower()
            s += scores[i]
            i += 1
        if acc != target:
            return None
        out.append(s)
    return (words, out) if i == len(pieces) else None


def _merge_words(pieces: list[str], scores: list[float]) -> tuple[list[str], list[float]]:
    words, out, cur, acc = [], [], "", 0.0
    for p, s in zip(pieces, scores):
        cur, acc = cur + p, acc + s
        if p.endswith(" "):
            words.append(cur.strip())
            out.append(acc)
            cur, acc = "", 0.0
    if cur.strip():
        words.append(cur.strip())
        out.append(acc)
    return words, out


def attribute_text(
    model: SparcModel, text_encoder: FeatureEncoder, text: str, target: Target | None = None, method: str = "grad"
) -> WordScores:
    """Per-word relevance of ``text`` for ``target`` (default: the caption's own code)."""
    if method not in TEXT_METHODS:
        raise AttributionError(f"unknown method {method!r}; methods: {list(TEXT_METHODS)}")
    if not isinstance(text_encoder, ClipTextEncoder):
        raise AttributionError(f"caption attribution needs the CLIP text tower (stream {text_encoder.stream!r} is not one)")
    if text_encoder.stream not in model.streams:
        raise AttributionError(f"the checkpoint has no stream {text_encoder.stream!r} (it has {model.streams})")
    target = target or text_target(model, text_encoder, text)
    clip = text_encoder.clip
    text = budget_text(text, clip.context_length)  # the words the model sees: the same cut as encoding
    tokens = clip.tokenize([text]).to(clip.device)
    ids = tokens[0].tolist()
    eot = int(tokens[0].argmax())  # open_clip pools at the end-of-text token (the largest id)
    rec, store = _Recorder(), {}

    def keep_embedding(module, inputs, output):
        if not output.requires_grad:  # a frozen tower: the embeddings carry the gradient themselves
            output = output.detach().requires_grad_(True)
        store["emb"] = output
        return output

    h = clip.model.token_embedding.register_forward_hook(keep_embedding)
    try:
        with torch.enable_grad(), _clip_attention(clip.model.transformer, rec):
            feats = clip.model.encode_text(tokens, normalize=True).float()
            logits = model.logits(text_encoder.stream, feats.to(model.device))
            score = (F.relu(logits) * target.tensor(model.n_latents, model.device)).sum()
            emb = store["emb"]
            grads = _input_grads(score, [emb, *rec.maps])
    finally:
        h.remove()
    if method == "grad":
        e = emb[0].detach()
        # baseline: the caption's mean word with the vocabulary's average token counted as one more word (the
        # caption's own mean alone would erase a one-word caption)
        vocab = clip.model.token_embedding.weight.detach().mean(0, keepdim=True)
        baseline = (e[1:eot].sum(0, keepdim=True) + vocab) / eot
        s = torch.zeros(len(e)) if grads[0] is None else (grads[0][0] * (e - baseline)).sum(-1).cpu()
    else:
        n = tokens.shape[1]
        r = torch.eye(n)
        for a, g in zip(rec.maps, grads[1:]):
            if g is not None:
                r = r + (g[0].float() * a[0].detach().float()).clamp_min(0).mean(0).cpu() @ r
        s = r[eot]
    span = list(range(1, eot))  # between start- and end-of-text
    pieces = _token_strings(clip.tokenizer, [ids[i] for i in span])
    piece_scores = [float(s[i]) for i in span]
    words, scores = _align_to_caption(text, pieces, piece_scores) or _merge_words(pieces, piece_scores)
    top = max((abs(x) for x in scores), default=0.0)
    return WordScores(words, [x / top if top > 0 else 0.0 for x in scores], method, target)
