"""The batcher's row surgery on a ragged KV cache (inference/front/kv_rows.py), on transformers' own DynamicCache:
each row's real tokens keep their values and order through appending, dropping and compacting rows."""
import torch
from transformers import DynamicCache

from tierstore.inference.front.kv_rows import compact, keep_rows, merge_rows, plain_layers
from tierstore.inference.placement.kv import COLUMN_SLACK

LAYERS, HEADS, HEAD_DIM = 2, 2, 4


def _cache(rows: list[list[float]]) -> tuple[DynamicCache, torch.Tensor]:
    """A cache whose row r holds the tokens `rows[r]` right-aligned (each token's keys filled with its value,
    values with its negative), and its mask."""
    columns = max(map(len, rows))
    keys = torch.zeros(len(rows), HEADS, columns, HEAD_DIM)
    mask = torch.zeros(len(rows), columns, dtype=torch.long)
    for r, tokens in enumerate(rows):
        for c, value in enumerate(tokens, start=columns - len(tokens)):
            keys[r, :, c] = value
            mask[r, c] = 1
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(keys.clone(), -keys.clone(), layer)
    return cache, mask


def _rows(cache: DynamicCache, mask: torch.Tensor) -> list[list[float]]:
    """Each row's real tokens, in order, checked alike in every layer, keys and values."""
    found = []
    for layer in cache.layers:
        rows = [[float(layer.keys[r, 0, c, 0]) for c in range(mask.shape[1]) if mask[r, c]] for r in
                range(mask.shape[0])]
        assert rows == [[-float(layer.values[r, 0, c, 0]) for c in range(mask.shape[1]) if mask[r, c]]
                        for r in range(mask.shape[0])]
        found.append(rows)
    assert all(rows == found[0] for rows in found)
    return found[0]


def test_merge_appends_rows_right_aligned_to_the_longer_side():
    cache, mask = _cache([[1, 2, 3], [4]])
    other, other_mask = _cache([[5, 6, 7, 8, 9]])
    mask = merge_rows(cache, mask, other, other_mask)
    assert mask.shape == (3, 5)
    assert mask.tolist()[0] == [0, 0, 1, 1, 1]
    assert _rows(cache, mask) == [[1, 2, 3], [4], [5, 6, 7, 8, 9]]


def test_merge_with_nothing_cached_adds_empty_rows():
    cache, mask = _cache([[1, 2]])
    mask = merge_rows(cache, mask, None, torch.zeros((2, 0), dtype=torch.long))
    assert mask.shape == (3, 2) and mask[1:].sum() == 0
    assert cache.layers[0].keys.shape[0] == 3
    assert _rows(cache, mask) == [[1, 2], [], []]


def test_keep_rows_drops_the_others_in_the_order_given():
    cache, mask = _cache([[1], [2, 3], [4, 5, 6]])
    mask = keep_rows(cache, mask, [2, 0])
    assert _rows(cache, mask) == [[4, 5, 6], [1]]
    assert cache.layers[1].keys.shape[0] == 2


def test_compact_drops_columns_no_row_uses():
    cache, mask = _cache([[1, 2, 3, 4], [5, 6]])
    mask = keep_rows(cache, mask, [1])  # the long row leaves: its two extra columns are now unused
    mask = compact(cache, mask)
    assert mask.tolist() == [[1, 1]]
    assert cache.layers[0].keys.shape[2] == 2
    assert _rows(cache, mask) == [[5, 6]]


def test_compact_repacks_rows_whose_masked_columns_outgrow_the_slack():
    """Rows that joined at different times leave holes; past COLUMN_SLACK times the longest row's real tokens
    (plus 16 columns) each row's real tokens are gathered to the right, in order."""
    columns = 40
    cache, _ = _cache([[0.0] * columns, [0.0] * columns])
    mask = torch.zeros(2, columns, dtype=torch.long)
    for row, column, value in ((0, 5, 1.0), (0, 30, 2.0), (1, 20, 3.0)):
        mask[row, column] = 1
        for layer in cache.layers:
            layer.keys[row, :, column], layer.values[row, :, column] = value, -value
    assert columns - 5 > COLUMN_SLACK * 2 + 16  # the columns from the first one used outgrow the slack
    mask = compact(cache, mask)
    assert mask.tolist() == [[1, 1], [0, 1]]
    assert cache.layers[0].keys.shape[2] == 2
    assert _rows(cache, mask) == [[1.0, 2.0], [3.0]]


def test_only_plain_layers_are_reshaped():
    cache, _ = _cache([[1]])
    assert plain_layers(cache)
    assert not plain_layers(object())
