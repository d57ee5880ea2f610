"""validate.py: the validation grid's layout. The held-out loss and the grids of a run: tests/test_train.py; the
conditioning check: tests/test_mask_data.py."""

import validate


def test_tile_grid_keeps_every_tile_whole():
    """Rows of different sizes and lengths (one or two controls): every tile lands whole where its right-aligned
    column and its row put it, with white gaps between cells."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tile = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    rows = [[tile(64, 48), tile(64, 48), tile(80, 64)], [tile(32, 32), tile(40, 24), tile(32, 32), tile(16, 16)]]
    grid = validate.tile_grid(rows, gap=2)
    xs, ys = [0, 34, 100, 166], [0, 66]  # column widths 32, 64, 64, 80; row heights 64, 32
    assert grid.size == (246, 98)
    for r, y in zip(rows, ys):
        for t, x in zip(r, xs[len(xs) - len(r):]):
            assert np.array_equal(np.asarray(grid.crop((x, y, x + t.width, y + t.height))), np.asarray(t))
    assert grid.getpixel((98, 10)) == (255, 255, 255) and grid.getpixel((10, 64)) == (255, 255, 255)
