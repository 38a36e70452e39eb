"""Every registered method's contract cases: name -> (config factory, what it promises).

A method's issue adds its entries here; test_contract.py crosses them with every
architecture in tiny.BUILDERS. Promises:
  identity_at_init  outputs equal the base model right after attach
  mergeable         merge()/unmerge() are exact and merge keeps the outputs
  archs             architectures it applies to (default: all)
  unloadable        merge_and_unload() gives a plain model (default True; False for inserted modules)
"""
import deltatune as dt

CASES = {
    "lora": dict(make=lambda: dt.LoRAConfig(r=4, alpha=8), identity_at_init=True, mergeable=True),
    "lora_dora": dict(make=lambda: dt.LoRAConfig(r=4, use_dora=True), identity_at_init=True, mergeable=True),
    "lora_rslora_embed": dict(make=lambda: dt.LoRAConfig(r=4, use_rslora=True, targets=r".*(embed_tokens|wte|shared|word_embeddings|q_proj|c_attn|query|\.q)"),
                              identity_at_init=True, mergeable=True, archs=["llama", "llama_cls", "bert"]),
    "bitfit": dict(make=lambda: dt.BitFitConfig(add_missing=True), identity_at_init=True, mergeable=True),
    "partial": dict(make=lambda: dt.PartialConfig(last_k_layers=1), identity_at_init=True, mergeable=False),
    "full": dict(make=lambda: dt.FullConfig(), identity_at_init=True, mergeable=False),
    "adapter_houlsby": dict(make=lambda: dt.AdapterConfig(kind="houlsby", bottleneck=8), identity_at_init=True,
                            mergeable=False, unloadable=False),
    "adapter_pfeiffer_inv": dict(make=lambda: dt.AdapterConfig(kind="pfeiffer", reduction_factor=4, invertible=True,
                                                               non_linearity="gelu"),
                                 identity_at_init=True, mergeable=False, unloadable=False),
    "adapter_parallel": dict(make=lambda: dt.AdapterConfig(kind="parallel", placement="both", bottleneck=8,
                                                           scaling="learned"),
                             identity_at_init=True, mergeable=False, unloadable=False),
    "mam": dict(make=lambda: dt.MAMConfig(prefix_length=3, prefix_reparam_hidden=16, bottleneck=16),
                mergeable=False, unloadable=False),
    # continuous prompts: extra inputs / keys and values, so not identity at init and not foldable into weights
    "prompt_tuning": dict(make=lambda: dt.PromptTuningConfig(num_virtual_tokens=3, init="vocab"),
                          mergeable=False, unloadable=False),
    "p_tuning_lstm": dict(make=lambda: dt.PTuningConfig(template="[P][P][P] {text}", encoder_hidden=16),
                          mergeable=False, unloadable=False),
    "prefix_reparam": dict(make=lambda: dt.PrefixConfig(num_virtual_tokens=3, reparam_hidden=16),
                           mergeable=False, unloadable=False),
    "p_tuning_v2": dict(make=lambda: dt.PTuningV2Config(num_virtual_tokens=3), mergeable=False, unloadable=False),
    # sparse and low-dimensional deltas (issue 5)
    "diff_pruning": dict(make=lambda: dt.DiffPruningConfig(density=0.05), identity_at_init=True, mergeable=True),
    "diff_pruning_rows": dict(make=lambda: dt.DiffPruningConfig(density=0.1, structured=True),
                              identity_at_init=True, mergeable=True),
    "intrinsic": dict(make=lambda: dt.IntrinsicConfig(dim=100), identity_at_init=True, mergeable=True),
    "intrinsic_dense_said": dict(make=lambda: dt.IntrinsicConfig(dim=60, projection="dense", said=True),
                                 identity_at_init=True, mergeable=True),
    # (IA)^3 (PEFT's per-architecture defaults; all-linear) and LayerNorm tuning (trained copies of the norms)
    "ia3": dict(make=lambda: dt.IA3Config(), identity_at_init=True, mergeable=True),
    "ia3_all_linear": dict(make=lambda: dt.IA3Config(targets="all-linear"), identity_at_init=True, mergeable=True),
    "ln_tuning": dict(make=lambda: dt.LNTuningConfig(), identity_at_init=True, mergeable=False),
    # LyCORIS family: LoKr's factors full (r=4) and all low-rank (r=1, decompose_both)
    "loha": dict(make=lambda: dt.LoHaConfig(r=4, alpha=8), identity_at_init=True, mergeable=True),
    "lokr": dict(make=lambda: dt.LoKrConfig(r=4, alpha=8), identity_at_init=True, mergeable=True),
    "lokr_decompose_both": dict(make=lambda: dt.LoKrConfig(r=1, decompose_both=True, init_weights="lycoris"),
                                identity_at_init=True, mergeable=True),
    # VeRA (shared random A, B; seed-only file with dropout on q/v-like modules) and OFT (series, exact Cayley + COFT,
    # one shared block on embeddings and queries)
    "vera": dict(make=lambda: dt.VeRAConfig(r=8), identity_at_init=True, mergeable=True),
    "vera_seed_only": dict(make=lambda: dt.VeRAConfig(r=4, save_projection=False, vera_dropout=0.1,
                                                      targets=r".*(q_proj|c_attn|query|\.q|v_proj|value|\.v|fc1|wi)"),
                           identity_at_init=True, mergeable=True),
    "oft": dict(make=lambda: dt.OFTConfig(block_size=8), identity_at_init=True, mergeable=True),
    "oft_exact_coft": dict(make=lambda: dt.OFTConfig(r=4, block_size=0, use_cayley_neumann=False, coft=True, eps=1e-2),
                           identity_at_init=True, mergeable=True),
    "oft_shared_embed": dict(make=lambda: dt.OFTConfig(r=4, block_size=0, block_share=True,
                                                       targets=r".*(embed_tokens|word_embeddings|q_proj|query)"),
                             identity_at_init=True, mergeable=True, archs=["llama", "llama_cls", "bert"]),
    # AdaLoRA: SVD-form LoRA (E zero at init); with dropout on query/value-like modules
    "adalora": dict(make=lambda: dt.AdaLoRAConfig(init_r=4, target_r=2), identity_at_init=True, mergeable=True),
    "adalora_dropout": dict(make=lambda: dt.AdaLoRAConfig(init_r=3, target_r=1, alpha=4, dropout=0.1,
                                                          targets=r".*(q_proj|c_attn|query|\.q|v_proj|value|\.v)"),
                            identity_at_init=True, mergeable=True),
    # LoRA inits (docs/lora_init.md): PiSSA and OLoRA replace the base weight by a residual (disabled() gives
    # the original back); EVA as attached, before dt.init_eva sets A from data
    "lora_pissa": dict(make=lambda: dt.LoRAConfig(r=4, alpha=8, init="pissa"), identity_at_init=True, mergeable=True),
    "lora_olora_qv": dict(make=lambda: dt.LoRAConfig(r=4, init="olora",
                                                     targets=r".*(q_proj|c_attn|query|\.q|v_proj|value|\.v)"),
                          identity_at_init=True, mergeable=True),
    "lora_eva": dict(make=lambda: dt.LoRAConfig(r=4, init="eva"), identity_at_init=True, mergeable=True),
}
