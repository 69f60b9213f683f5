"""The rotation a rotated store's matrices are quantized in (tierstore/rotation.py): orthogonal, the same on every
call, its inverse exact, and the inputs' second moment turned with it."""
import torch

from tierstore import rotation


def test_a_rotation_is_orthogonal_and_turning_back_undoes_it_in_chunks(monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(37, 3 * rotation.BLOCK)
    turned = rotation.rotate(weight, "layers.0.q_proj.weight")
    assert torch.equal(turned, rotation.rotate(weight, "layers.0.q_proj.weight"))  # seeded by the name
    assert not torch.allclose(turned, rotation.rotate(weight, "layers.0.k_proj.weight"))
    r = rotation.rotate(torch.eye(weight.shape[1]), "layers.0.q_proj.weight")
    torch.testing.assert_close(r @ r.T, torch.eye(weight.shape[1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(turned, weight @ r)
    monkeypatch.setattr(rotation, "CHUNK_ELEMENTS", 2 * weight.shape[1])  # two rows at a time
    back = turned.clone()
    rotation.unrotate_(back, "layers.0.q_proj.weight")
    torch.testing.assert_close(back, weight, atol=1e-5, rtol=0)


def test_the_second_moment_turns_with_the_inputs_so_outputs_are_unchanged():
    torch.manual_seed(1)
    weight, inputs = torch.randn(8, 2 * rotation.BLOCK), torch.randn(50, 2 * rotation.BLOCK)
    r = rotation.rotate(torch.eye(weight.shape[1]), "w")
    turned_inputs = inputs @ r  # each row: Rᵀ x
    torch.testing.assert_close(turned_inputs @ rotation.rotate(weight, "w").T, inputs @ weight.T, atol=1e-4, rtol=0)
    torch.testing.assert_close(rotation.rotate_hessian(inputs.T @ inputs, "w"), turned_inputs.T @ turned_inputs,
                               atol=1e-3, rtol=1e-5)


def test_only_matrices_of_whole_blocks_of_columns_are_turned():
    assert rotation.applies((5, 128)) and rotation.applies((1, 64))
    assert not rotation.applies((64, 96)) and not rotation.applies((4, 64, 64)) and not rotation.applies((64,))
