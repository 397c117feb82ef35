"""Launch configurations of the Triton kernels, chosen from the shape alone (no autotuning per
call; the same shape always gets the same configuration, so results are bitwise reproducible).

NOT MEASURED: there was no GPU where these were written. They are reasoned from the kernels'
memory traffic and should be re-tuned with the benchmark on an H100/H200:

- A tile holds TILE_ELEMENTS = 4096 elements (ROWS x BLOCK_S, powers of two): 16 per thread at
  8 warps, enough loads in flight per thread to hide memory latency while the 3-5 float32 lane
  accumulators (sum, max, index, GeM's log-sum) stay in registers. Smaller tiles get 4 warps
  (>= 1024 elements) or 2.
- NCS: BLOCK_S = next power of two >= S, at most 1024, so a row is read in long contiguous runs
  (S = 49 -> 64 lanes, 32 rows per tile: a 7x7 head is read as 32 rows at once); ROWS fills
  the rest of the tile.
- NSC: ROWS = a block of up to 64 consecutive channels (128-256 contiguous bytes per spatial
  offset, whole memory transactions), BLOCK_S fills the rest of the tile.
- Fewer than TARGET_PROGRAMS programs (2 per SM of a 132-SM H100) leave the GPU idle, so ROWS
  is halved until there are enough (down to 1 row for NCS, 16 channels for NSC). If even then
  there are too few and S is long, the forward splits S into pieces of whole tiles over a second
  grid axis and a combine kernel reduces the pieces in order (deterministic); the backward has
  no reduction and always spreads S over its second grid axis.
"""
from __future__ import annotations

from dataclasses import dataclass

TILE_ELEMENTS = 4096
TARGET_PROGRAMS = 264
MAX_BLOCK_S = 1024
MAX_CHANNEL_BLOCK = 64
MIN_CHANNEL_BLOCK = 16
MIN_SPLIT_TILES = 4  # a forward piece of S is at least this many tiles long
MAX_GRID_Y = 65535  # CUDA's limit for the second grid dimension
BACKWARD_TILES_PER_PROGRAM = 4
COMBINE_ROWS = 128


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchConfig:
    rows: int  # ROWS: (n, c) rows per program
    block_s: int  # BLOCK_S: spatial offsets per loop step
    num_warps: int
    row_programs: int  # grid size along axis 0
    s_programs: int  # grid size along axis 1: pieces of S
    s_per_program: int  # length of one piece of S (a multiple of block_s unless it is S)


def _num_warps(tile: int) -> int:
    if tile >= TILE_ELEMENTS:
        return 8
    return 4 if tile >= 1024 else 2


def _row_programs(n: int, c: int, rows: int, channels_last: bool) -> int:
    return n * _cdiv(c, rows) if channels_last else _cdiv(n * c, rows)


def _tile(n: int, c: int, s: int, channels_last: bool) -> tuple[int, int, int]:
    """(rows, block_s, row_programs): the tile shape, with rows reduced for small grids."""
    if channels_last:
        rows = min(next_power_of_2(c), MAX_CHANNEL_BLOCK)
        block_s = max(1, min(TILE_ELEMENTS // rows, next_power_of_2(s)))
        min_rows = min(rows, MIN_CHANNEL_BLOCK)
    else:
        block_s = min(next_power_of_2(s), MAX_BLOCK_S)
        rows = max(1, min(TILE_ELEMENTS // block_s, next_power_of_2(n * c)))
        min_rows = 1
    while rows > min_rows and _row_programs(n, c, rows, channels_last) < TARGET_PROGRAMS:
        rows //= 2
    return rows, block_s, _row_programs(n, c, rows, channels_last)


def forward_config(n: int, c: int, s: int, channels_last: bool) -> LaunchConfig:
    rows, block_s, row_programs = _tile(n, c, s, channels_last)
    s_programs, s_per_program = 1, s
    tiles = _cdiv(s, block_s)
    if row_programs < TARGET_PROGRAMS and tiles >= 2 * MIN_SPLIT_TILES:
        wanted = min(_cdiv(TARGET_PROGRAMS, row_programs), tiles // MIN_SPLIT_TILES, MAX_GRID_Y)
        s_per_program = _cdiv(tiles, wanted) * block_s
        s_programs = _cdiv(s, s_per_program)
    return LaunchConfig(rows, block_s, _num_warps(rows * block_s), row_programs, s_programs,
                        s_per_program)


def backward_config(n: int, c: int, s: int, channels_last: bool) -> LaunchConfig:
    rows, block_s, row_programs = _tile(n, c, s, channels_last)
    tiles = _cdiv(s, block_s)
    tiles_per_program = max(min(tiles, BACKWARD_TILES_PER_PROGRAM), _cdiv(tiles, MAX_GRID_Y))
    s_per_program = tiles_per_program * block_s
    return LaunchConfig(rows, block_s, _num_warps(rows * block_s), row_programs,
                        _cdiv(s, s_per_program), s_per_program)
