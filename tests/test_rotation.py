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


def test_a_rotated_unit_is_turned_back_whether_dequantized_whole_or_matrix_by_matrix():
    """compress_unit quantizes W R where a matrix has whole blocks of columns (w1, w2; w3's 96 columns are not:
    as it is), and the Decompressor turns it back, for a whole unit and for one matrix at a time alike."""
    import dataclasses

    from tierstore import ggml, ggml_quantize
    from tierstore.compression import Codec, Decompressor, compress_unit
    from tierstore.units import UnitLayout

    torch.manual_seed(2)
    tensors = {"w1": torch.randn(32, 2 * rotation.BLOCK), "w2": torch.randn(32, 256), "w3": torch.randn(16, 96)}
    layout = UnitLayout.pack("u", {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for name, view in layout.views(buffer).items():
        view.copy_(tensors[name])
    codec = dataclasses.replace(Codec.create("q4_k"), rotation=rotation.HADAMARD)  # the mechanics, without GPTQ
    packed_layout, packed_buffer, packed = compress_unit(layout, buffer, set(tensors), codec, torch.device("cpu"))
    want = {}
    for name, weight in tensors.items():
        format = packed.formats[name][0]
        turned = rotation.applies(tuple(weight.shape))
        blocks = ggml_quantize.quantize(format, (rotation.rotate(weight, name) if turned else weight).reshape(-1))
        restored = torch.empty(weight.numel())
        ggml.dequantize(format, blocks, restored)
        restored = restored.view_as(weight)
        want[name] = restored @ rotation.rotate(torch.eye(weight.shape[1]), name).T if turned else restored
    views = packed_layout.views(packed_buffer)
    whole = Decompressor(codec, {"u": packed}, torch.float32, torch.device("cpu")).materialize("u", views)
    by_matrix = Decompressor(codec, {"u": packed}, torch.float32, torch.device("cpu"), per_matrix={"u"})
    for name, weight in tensors.items():
        torch.testing.assert_close(whole[name], want[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(by_matrix.materialize_matrix("u", name, views), want[name], atol=1e-5, rtol=0)
        assert ((whole[name] - weight).norm() / weight.norm()).item() < 0.12  # Q4_K's error, not garbage
