"""minillm.viz.paging: the layouts are right, figures build, the stepper drives a real BlockManager (no display)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from minillm.viz.paging import (  # noqa: E402
    FREE,
    RESERVED,
    PagingStepper,
    StepperRequest,
    draw_blocks,
    draw_memory_maps,
    layout_memory,
    sample_request_lengths,
)


def test_sample_request_lengths_is_seeded_and_clipped():
    a = sample_request_lengths(50, 512, seed=3)
    assert a == sample_request_lengths(50, 512, seed=3)
    assert a != sample_request_lengths(50, 512, seed=4)
    assert len(a) == 50 and all(1 <= n <= 512 for n in a)
    with pytest.raises(ValueError, match="positive"):
        sample_request_lengths(0, 512)


def test_layout_counts_every_token_once_and_paged_waste_is_below_one_block():
    lengths = [5, 16, 17, 40, 1]
    lay = layout_memory(lengths, max_len=48, block_size=8)
    for i, n in enumerate(lengths):
        assert int((lay.contiguous == i + 2).sum()) == n
        assert int((lay.paged == i + 2).sum()) == n
        assert len(lay.block_tables[i]) == -(-n // 8)
    assert lay.contiguous.shape == lay.paged.shape  # the same bytes
    assert lay.contiguous_waste == pytest.approx(1 - sum(lengths) / (5 * 48))
    idle = sum(-(-n // 8) * 8 - n for n in lengths)
    assert int((lay.paged == RESERVED).sum()) == idle
    assert lay.paged_waste == pytest.approx(idle / (idle + sum(lengths)))
    assert int((lay.paged == FREE).sum()) == lay.paged.size - lay.num_blocks_used * 8
    blocks = [b for t in lay.block_tables for b in t]
    assert len(set(blocks)) == len(blocks)
    with pytest.raises(ValueError, match="max_len"):
        layout_memory([49], max_len=48)


def test_memory_map_figure_builds():
    lay = layout_memory(sample_request_lengths(8, 256, seed=0), 256, 16)
    fig = draw_memory_maps(lay)
    assert len(fig.axes) == 2
    assert "waste" in fig.axes[0].get_title() and "waste" in fig.axes[1].get_title()
    plt.close(fig)


def scripted():
    system = list(range(1, 9))  # two full blocks of 4 shared by A and B
    return [
        StepperRequest("A", system + [20, 21, 22], max_new_tokens=5, arrival=0),
        StepperRequest("C", [40, 41, 42, 43, 44, 45], max_new_tokens=3, arrival=1, n=2),
        StepperRequest("B", system + [30, 31], max_new_tokens=4, arrival=2),
    ]


def test_stepper_allocates_shares_copies_on_write_and_frees():
    st = PagingStepper(scripted(), num_blocks=16, block_size=4)
    st.step()
    assert st.bm.block_table(0) == [0, 1, 2]
    st.step()  # C arrives and forks: C2 shares C1's blocks
    c1, c2 = 1, 2
    assert st.bm.block_table(c1) == st.bm.block_table(c2)
    assert all(st.bm.ref_counts[b] == 2 for b in st.bm.block_table(c1))
    events = st.step()  # C1 writes into the shared half-full block; B finds the system prompt cached
    assert any("copy-on-write" in e for e in events)
    assert any("B:" in e and "prefix cache" in e for e in events)
    assert st.bm.block_table(3)[:2] == st.bm.block_table(0)[:2]
    st.run()
    assert st.is_done and not st.bm.tables
    assert all(r == 0 for r in st.bm.ref_counts)
    assert st.bm.num_free_blocks == st.bm.num_blocks
    assert [s.step for s in st.history] == list(range(len(st.history)))
    assert st.history[0].block_manager.num_used_blocks == 0  # snapshots are copies, not the live manager


def test_stepper_runs_the_engine_loop_and_preempts_when_the_pool_runs_out():
    script = [StepperRequest(name, [i] * 6, max_new_tokens=6, arrival=0) for i, name in enumerate("ABC")]
    st = PagingStepper(script, num_blocks=7, block_size=4).run()  # 3 x 3 blocks at full length: 7 do not fit
    events = [e for snap in st.history for e in snap.events]
    assert any("preempted" in e for e in events) and any("back after preemption" in e for e in events)
    assert st.engine.stats()["num_preemptions"] >= 1
    assert all(seq.is_finished and len(seq.output_token_ids) == 6 for seq in st.seqs.values())  # nothing lost
    assert st.is_done and st.bm.num_free_blocks == st.bm.num_blocks
    for snap in st.history:  # every drawn sequence has its count, from the Sequence that owns it
        assert set(snap.num_tokens) == set(snap.block_manager.tables)


def test_stepper_figures_and_widget_build():
    st = PagingStepper(scripted(), num_blocks=16, block_size=4).run()
    fig = st.snapshots([1, 3, 5])
    assert len(fig.axes) == 3
    plt.close(fig)
    snap = st.history[3]
    ax = draw_blocks(snap.block_manager, snap.num_tokens, snap.names)
    assert ax.patches
    plt.close(ax.figure)
    pytest.importorskip("ipywidgets")
    w = st.widget()
    slider = w.children[0].children[1]
    assert slider.max == len(st.history) - 1
    slider.value = 2  # redraws into the Output widget without a display
    plt.close("all")
