"""The published config.json values of DeepSeek releases (spec section 1.3), as dicts: the shapes `dsinfer
bench` builds random models of, and what `inspect` and the tests check against."""

# In the published key style (rope_scaling + rope_theta).
V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
          moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
          num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
          topk_group=4, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
          routed_scaling_factor=2.5, first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536,
          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu",
          max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
          rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                            beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
          quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                   weight_block_size=[128, 128]),
          tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
               moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, scoring_func="softmax",
               topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1,
               q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               max_position_embeddings=163840, rope_theta=10000,
               rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                 beta_slow=1, mscale=0.707, mscale_all_dim=0.707), bos_token_id=100000,
               eos_token_id=100001)

# DeepSeek-V4-Flash as its config.json states it (spec section 1.3): the published keys (compress_ratios with the
# MTP block's entry last, num_hash_layers, rope_scaling for the compressed layers).
V4_FLASH = dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048,
                num_hidden_layers=43, num_nextn_predict_layers=1, num_attention_heads=64, num_key_value_heads=1,
                head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
                n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus",
                topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5, swiglu_limit=10.0,
                num_hash_layers=3, compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0], sliding_window=128,
                index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
                rope_theta=10000, compress_rope_theta=160000,
                rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=65536, beta_fast=32,
                                  beta_slow=1),
                max_position_embeddings=1048576, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
                quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                         scale_fmt="ue8m0", weight_block_size=[128, 128]),
                bos_token_id=0, eos_token_id=1)

PUBLISHED = {"v3": V3, "v2-lite": V2_LITE}
