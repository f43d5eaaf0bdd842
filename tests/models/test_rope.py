"""YaRN frequencies and cos/sin factors against HF transformers' rope utilities (the oracle), and the
interleaved rotation against complex multiplication."""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dsinfer.models.args import RopeArgs
from dsinfer.models.rope import apply_rotary, rope_attention_factor, rope_cos_sin, rope_inv_freq


@pytest.mark.parametrize("params", [
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707,
         mscale_all_dim=0.707),
    dict(factor=4.0, original_max_position_embeddings=256, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5),
    dict(factor=16.0, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1),
])
@pytest.mark.parametrize("dim", [8, 64])
def test_yarn_matches_hf(params, dim):
    cfg = DeepseekV3Config(qk_rope_head_dim=dim, max_position_embeddings=163840,
                           rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, **params))
    hf_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    ours = RopeArgs(rope_type="yarn", theta=10000.0, factor=params["factor"],
                    original_seq_len=params["original_max_position_embeddings"], beta_fast=params["beta_fast"],
                    beta_slow=params["beta_slow"], mscale=params.get("mscale", 0), mscale_all_dim=params.get(
                        "mscale_all_dim", 0))
    torch.testing.assert_close(rope_inv_freq(ours, dim).float(), hf_freq, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours) == pytest.approx(hf_factor)


def test_plain_rope_table():
    table = rope_cos_sin(RopeArgs(theta=10000.0), 8, 5)
    pos, i = 3, 2
    angle = pos * 10000.0 ** (-2 * i / 8)
    assert table.shape == (5, 4, 2)
    assert table[pos, i, 0].item() == pytest.approx(torch.tensor(angle).cos().item(), abs=1e-7)
    assert table[pos, i, 1].item() == pytest.approx(torch.tensor(angle).sin().item(), abs=1e-7)


def test_interleaved_rotation_is_complex_multiplication():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8)
    table = rope_cos_sin(RopeArgs(theta=500.0), 8, 6)
    ref = torch.view_as_real(torch.view_as_complex(x.view(6, 3, 4, 2)) *
                             torch.polar(torch.ones(6, 1, 4), torch.atan2(table[:, None, :, 1], table[:, None, :, 0])))
    torch.testing.assert_close(apply_rotary(x, table), ref.view(6, 3, 8), rtol=1e-5, atol=1e-6)
