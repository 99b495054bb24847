"""Generation with the recurrent FAVOR+ cache: same tokens as uncached full forwards, constant-size state."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.cache_utils import DynamicCache

import hf_performer.integration as I
from hf_performer.integration.cache import FavorCacheLayer
from hf_performer.settings import PerformerConfig

V = 96


def gpt2(local_window=0, **kw):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    performer = PerformerConfig(nb_features=32, seed=5, local_window=local_window)
    return I.convert_to_performer(tf.GPT2LMHeadModel(cfg), performer).eval()


def left_padded_prompts():
    g = torch.Generator().manual_seed(7)
    lengths = [6, 3, 5]
    ids = torch.zeros((3, 6), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 6 - n:] = torch.randint(3, V, (n,), generator=g)
        mask[i, 6 - n:] = 1
    return ids, mask


NEW = 10
COMMON = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)


@pytest.mark.parametrize("local_window", [0, 3])
def test_greedy_cached_equals_uncached_full_forwards(local_window):
    model, (ids, mask) = gpt2(local_window), left_padded_prompts()
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **COMMON)
        seq, m = ids, mask  # the uncached reference: a full forward over the whole sequence per token
        for _ in range(NEW):
            positions = (m.cumsum(-1) - 1).clamp_min(0)  # stock GPT-2 generation positions under left padding
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, seq)
    assert len(set(cached[:, ids.shape[1]:].flatten().tolist())) > 3  # not a degenerate constant output


@pytest.mark.parametrize("local_window", [0, 2])
def test_generation_after_a_prompt_of_several_chunks_equals_full_forwards(local_window):
    """A prompt longer than the chunk size (130 tokens: 3 chunks of 64) on a calibrated model whose logits spread
    widely (initializer range 0.6): the prefill's state used to be rescaled with a weight clamped to 1, and every
    generated token's logits then differed from a full forward's by up to 6.4 (found in a bug hunt). float64:
    generate's scores against a full forward over each generated sequence."""
    from hf_performer import calibrate_feature_statistics

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.6,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = I.convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=32, seed=5,
                                                                            local_window=local_window)).eval()
    g = torch.Generator().manual_seed(123)
    calibrate_feature_statistics(model, {"input_ids": torch.randint(3, V, (4, 24), generator=g)})
    model = model.double()
    ids = torch.randint(3, V, (2, 130), generator=g)
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, return_dict_in_generate=True, output_logits=True,
                             **COMMON)
        full = model(input_ids=out.sequences[:, :-1], use_cache=False).logits[:, ids.shape[1] - 1:]  # [2, NEW, V]
    steps = torch.stack(out.logits, 1).double()  # (generate returns its logits in float32)
    assert (steps - full).abs().max() < 1e-4 * full.abs().max()
    assert torch.equal(out.sequences[:, ids.shape[1]:], full.argmax(-1))


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample", "beam_sample"])
def test_generate_with_cache_equals_generate_without(mode):
    model, (ids, mask) = gpt2(), left_padded_prompts()
    kw = {
        "greedy": dict(do_sample=False),
        "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
        "sample": dict(do_sample=True, top_k=0),
        "beam_sample": dict(do_sample=True, num_beams=2),
    }[mode]
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **kw, **COMMON))
    assert torch.equal(outs[0], outs[1])


def test_generation_cache_is_constant_size_favor_state():
    model, (ids, mask) = gpt2(), left_padded_prompts()
    sizes = []
    for new in (2, 12):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=0, return_dict_in_generate=True)
        layers = out.cache.layers
        assert len(layers) == 2 and all(isinstance(layer, FavorCacheLayer) and layer.recurrent for layer in layers)
        assert all(layer.keys is None and layer.state is not None for layer in layers)  # no key/value storage
        assert layers[0].get_seq_length() == ids.shape[1] + new - 1
        sizes.append([layer.state.nbytes for layer in layers])
    assert sizes[0] == sizes[1]


def test_explicit_favor_cache_step_by_step_equals_full_forward():
    model = gpt2()
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # [B, 9, V]
        cache = I.FavorCache()
        first = model(input_ids=ids[:, :4], cache=cache, use_cache=True)
        steps = [first.logits]
        for t in range(4, 9):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=first.cache, use_cache=True).logits)
    assert first.cache is cache and cache.get_seq_length() == 9
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_default_forward_returns_a_cache_that_continues_decoding():
    model = gpt2()
    ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1])  # use_cache defaults to True for GPT-2
        last = model(input_ids=ids[:, -1:], cache=prefix.cache).logits[:, -1]
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)


def test_assisted_decoding_is_refused():
    model, (ids, mask) = gpt2(), left_padded_prompts()
    with pytest.raises(ValueError, match="cannot be cropped"):
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], assistant_model=gpt2(), max_new_tokens=3)
    with pytest.raises(ValueError, match="cannot be cropped"):
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], prompt_lookup_num_tokens=2, max_new_tokens=3)


def test_cache_rollback_is_refused():
    model = gpt2()
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, V, (1, 5)), cache=I.FavorCache(), use_cache=True)
    assert not out.cache.is_croppable
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        out.cache.crop(-1)


def test_key_value_cache_is_refused():
    model = gpt2()
    stock = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    with torch.no_grad():
        filled = stock(input_ids=torch.randint(3, V, (1, 4)), cache=DynamicCache(), use_cache=True).cache
        with pytest.raises(TypeError, match="FAVOR\\+ state"):
            model(input_ids=torch.randint(3, V, (1, 1)), cache=filled, use_cache=True)


def test_bert_decoder_generation_cached_equals_uncached():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, initializer_range=0.3, is_decoder=True, pad_token_id=0)
    model = I.convert_to_performer(tf.BertLMHeadModel(cfg), PerformerConfig(nb_features=32)).eval()
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(3))
    outs = []
    for use_cache in (True, False):
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, use_cache=use_cache, do_sample=False, **COMMON))
    assert torch.equal(outs[0], outs[1])


def test_prefill_with_grad_uses_the_fused_op_and_still_fills_the_cache():
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()  # same function in train and eval
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(4))
    out = model(input_ids=ids, labels=ids)  # GPT-2 builds a cache by default, training included
    out.loss.backward()
    assert all(p.grad is not None for p in model.transformer.h[0].attn.c_attn.parameters())
    assert out.cache.get_seq_length() == 7
    model.eval()
    with torch.no_grad():
        nxt = torch.randint(3, V, (2, 1))
        stepped = model(input_ids=nxt, cache=out.cache).logits[:, -1]
        full = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("local_window", [0, 3])
def test_gpt2_cross_attention_generation_cached_equals_uncached(local_window):
    """add_cross_attention: bidirectional FAVOR+ over the encoder keys (their padding honoured); a local window
    applies to self-attention only."""
    model = gpt2(local_window, add_cross_attention=True)
    favors = sorted((m.favor for m in model.modules() if hasattr(m, "favor")), key=lambda f: f.layer_id)
    assert [f.layer_id for f in favors] == [0, 1, 2, 3]  # self-attention 0..n-1, cross-attention n..2n-1
    assert [f.config.local_window for f in favors] == [local_window] * 2 + [0, 0]
    ids, mask = left_padded_prompts()
    g = torch.Generator().manual_seed(5)
    enc = torch.randn(3, 7, 32, generator=g)
    enc_mask = torch.ones(3, 7, dtype=torch.long)
    enc_mask[1, 4:] = 0
    outs = []
    for use_cache in (True, False):
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
                                       encoder_attention_mask=enc_mask, use_cache=use_cache, do_sample=False, **COMMON))
    assert torch.equal(outs[0], outs[1])


def test_cache_layer_batch_operations_follow_the_rows():
    model = gpt2()
    ids = torch.randint(3, V, (3, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model(input_ids=ids, cache=I.FavorCache(), use_cache=True).cache
    layer = cache.layers[0]
    S = layer.state.S.clone()  # [B, H, m, dv]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.state.S, S[[2, 0, 0]])
    cache.batch_select_indices(torch.tensor([True, False, True]))
    assert torch.equal(layer.state.S, S[[2, 0]])
    cache.batch_repeat_interleave(2)
    assert torch.equal(layer.state.S, S[[2, 2, 0, 0]])
    assert cache.get_seq_length() == 5
    cache.reset()
    assert layer.state is None and cache.get_seq_length() == 0


def compile_anywhere():
    """A CompileConfig for generate() that compiles on a CPU too (transformers compiles only on accelerators unless
    asked), the whole forward as one graph; aot_eager: a fast compile that still traces and functionalises."""
    config = tf.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("local_window", [0, 3])
def test_static_cache_generation_compiles_and_keeps_its_state_in_place(local_window):
    """generate(cache_implementation="static") with a CompileConfig compiles the decoding step in one graph (no
    graph break, fullgraph) and gives the eager tokens; the state tensors keep their addresses from step to step
    (copied into in place), which a CUDA graph needs. Without that the layer would not be compileable and
    transformers would decode eagerly (so the compiled call would not exist). One graph serves every step: no
    input grows (the mask generate hands a step is the new tokens' columns) and no Python int that changes per
    token is read (the token count is a tensor under compile); either would compile a second, dynamic graph, on
    which CUDA graphs record anew for every token. The token count read afterwards is the eager one."""
    import torch._dynamo.utils as dynamo_utils

    model, (ids, mask) = gpt2(local_window), left_padded_prompts()
    eager = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **COMMON)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    config = compile_anywhere()
    layers, addresses = [], []
    real_init = FavorCacheLayer.__init__

    def init(self, *args, **kwargs):  # the cache's layers, as generate builds them
        real_init(self, *args, **kwargs)
        layers.append(self)

    def record(input_ids, scores):  # a logits processor: runs eagerly after every forward
        addresses.append(tuple(t.data_ptr() for t in (layers[0].state.S, layers[0].state.z, layers[0].state.c)))
        return scores

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FavorCacheLayer, "__init__", init)
        compiled = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, cache_implementation="static",
                                  compile_config=config, logits_processor=tf.LogitsProcessorList([record]), **COMMON)
    assert hasattr(model, "_compiled_call")  # transformers took the compiled path
    assert torch.equal(compiled, eager)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # every decoding step (prefill runs eagerly)
    assert len(addresses) == NEW and len(set(addresses)) == 1  # prefill's tensors, updated in place ever after
    # prefill and NEW - 1 compiled steps (the last token is not fed back)
    assert [layer.get_seq_length() for layer in layers[-2:]] == [ids.shape[1] + NEW - 1] * 2


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("tokens", [2, 1], ids=["chunked_steps", "one_token_steps"])
def test_cached_steps_under_autograd_backpropagate_like_the_full_forward(tokens, window):
    """Steps that carry gradients through the state (the state is replaced, not overwritten in place, once it
    carries a gradient): the gradient of the stepped logits with respect to every token's embeddings equals the
    full forward's, the prompt's included (the prefill once built its state without autograd, so the prompt got
    none: found in a bug hunt). Steps of one token take ``recurrent._one_token`` (whose row maximum autograd once
    found modified in place), longer ones the chunked op. Float64: the two orders of summation then agree to
    ~1e-12."""
    model = gpt2(local_window=window).double()
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(6))
    embeds = model.transformer.wte(ids).detach().requires_grad_()
    full = model(inputs_embeds=embeds, use_cache=False).logits[:, 4:]
    (ref,) = torch.autograd.grad(full.square().sum(), embeds)
    cache = I.FavorCache()
    model(inputs_embeds=embeds[:, :4], cache=cache, use_cache=True)
    steps = [model(inputs_embeds=embeds[:, t:t + tokens], cache=cache, use_cache=True).logits
             for t in range(4, 8, tokens)]
    (got,) = torch.autograd.grad(torch.cat(steps, 1).square().sum(), embeds)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    assert ref[:, :4].abs().sum() > 0 and ref[:, 4:].abs().sum() > 0  # the prompt's share and the steps'
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_compiled_decoding_of_a_second_model_reuses_the_graphs():
    """The compiled decoding step guards on nothing that is one model's own (the calibrated flag is read as a
    plain bool under torch.compile): a second model of the same configuration decodes with the graphs the first
    compiled, so a process that compiles several models does not run into torch's recompile limit."""
    import torch._dynamo.utils as dynamo_utils

    config = compile_anywhere()
    ids, mask = left_padded_prompts()
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    graphs = []
    for seed in (1, 2):
        model = gpt2()
        model.transformer.h[0].attn.c_attn.weight.data.normal_(generator=torch.Generator().manual_seed(seed))
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, cache_implementation="static",
                       compile_config=config, **COMMON)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0]


@pytest.mark.parametrize("local_window", [0, 2])
def test_a_continuation_whose_mask_disagrees_with_the_cached_state_is_refused(local_window):
    """Bug hunt: a batched chat continuation, generate(..., past_key_values=turn_1_cache) with a mask that marks as
    padding some tokens the state absorbed as real (e.g. ``sequences != pad`` after a row ended early), silently
    kept them (row 0's logits off by 1.1; a key/value cache drops them). The state cannot drop a token: refused.
    The mask the earlier call used, extended for the new tokens, continues exactly as the full forward does."""
    model, (ids, mask) = gpt2(local_window), left_padded_prompts()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, do_sample=False,
                             **{**COMMON, "max_new_tokens": 4, "min_new_tokens": 4})
        seq = out.sequences  # [3, 10]
        more = torch.randint(3, V, (3, 2), generator=torch.Generator().manual_seed(3))
        turn2 = torch.cat([seq, more], 1)
        good = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)  # turn 1's mask, then real tokens
        bad = good.clone()
        bad[0, 8] = 0  # a generated token of row 0 marked as padding after the fact
        with pytest.raises(ValueError, match=r"marks 8 of the 9 tokens already in the cache as real in row 0, but "
                                             r"its FAVOR\+ state absorbed 9"):
            model.generate(input_ids=turn2, attention_mask=bad, past_key_values=out.past_key_values, do_sample=False,
                           max_new_tokens=1, pad_token_id=0)
        cont = model.generate(input_ids=turn2, attention_mask=good, past_key_values=out.past_key_values,
                              do_sample=False, max_new_tokens=1, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        positions = (good.cumsum(-1) - 1).clamp_min(0)
        full = model(input_ids=turn2, attention_mask=good, position_ids=positions, use_cache=False).logits[:, -1]
    torch.testing.assert_close(cont.logits[0], full, rtol=1e-4, atol=1e-4)
