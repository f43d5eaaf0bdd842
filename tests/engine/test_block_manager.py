"""BlockManager bookkeeping: reference counts, prefix hits, eviction order, and collision safety."""

from dsinfer.engine.block_manager import BlockManager
from dsinfer.engine.sequence import Sequence
from dsinfer.sampling import SamplingParams


def seq(tokens, i=0):
    return Sequence(i, list(tokens), len(tokens), SamplingParams(max_tokens=4), 1000)


def run_prefill(bm, s):
    bm.match_prefix(s)
    assert bm.ensure(s, s.num_tokens)
    s.num_cached_tokens = s.num_tokens
    bm.commit(s)


def test_prefix_hits_share_pages_and_skip_the_last_page():
    bm = BlockManager(num_pages=16, page_size=4)
    a = seq(range(10))                               # pages [0-3] [4-7] [8-9]
    run_prefill(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])           # shares two full pages
    bm.match_prefix(b)
    assert b.num_cached_tokens == 8 and b.block_table == a.block_table[:2]
    assert [bm.ref_count[p] for p in a.block_table] == [2, 2, 1]
    c = seq(range(8))                                # whole prompt cached: its last page is recomputed
    bm.match_prefix(c)
    assert c.num_cached_tokens == 4 and c.block_table == a.block_table[:1]


def test_release_frees_pages_but_keeps_them_reusable_until_evicted():
    bm = BlockManager(num_pages=4, page_size=4)
    a = seq(range(9))
    run_prefill(bm, a)
    pages = list(a.block_table)
    bm.release(a)
    assert bm.num_free_pages == 4 and all(bm.ref_count[p] == 0 for p in pages)
    b = seq(range(9), 1)
    bm.match_prefix(b)
    assert b.block_table == pages[:2] and bm.num_free_pages == 2
    bm.release(b)
    # the never-used page goes first, then the least recently freed: the unfilled last page of `a`
    other = seq([99] * 8, 2)
    assert bm.ensure(other, 8)
    assert pages[2] in other.block_table and pages[0] not in other.block_table
    again = seq(range(9), 3)
    bm.match_prefix(again)
    assert again.block_table == pages[:2]            # the shared prefix survived


def test_eviction_drops_the_cached_prefix():
    bm = BlockManager(num_pages=2, page_size=4)
    a = seq(range(5))
    run_prefill(bm, a)
    bm.release(a)
    b = seq([7] * 8, 1)
    assert bm.ensure(b, 8)                           # takes both pages, evicting a's cached page
    bm.release(b)
    c = seq(range(5), 2)
    bm.match_prefix(c)
    assert c.num_cached_tokens == 0 and not bm.cached


def test_ensure_is_all_or_nothing():
    bm = BlockManager(num_pages=3, page_size=4)
    a = seq(range(4))
    assert bm.ensure(a, 8)
    b = seq(range(4), 1)
    assert not bm.ensure(b, 8) and b.block_table == [] and bm.num_free_pages == 1


def test_hash_collision_is_not_a_hit(monkeypatch):
    bm = BlockManager(num_pages=8, page_size=4)
    a = seq(range(9))
    run_prefill(bm, a)
    monkeypatch.setattr(bm, "_hash", lambda s, i: (a.page_hashes[i], tuple(s.token_ids[i * 4:(i + 1) * 4])))
    b = seq([42] * 9, 1)                              # same hashes, different tokens
    bm.match_prefix(b)
    assert b.num_cached_tokens == 0


def test_prefix_caching_off():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    a = seq(range(9))
    run_prefill(bm, a)
    b = seq(range(9), 1)
    bm.match_prefix(b)
    assert b.num_cached_tokens == 0 and not bm.cached
