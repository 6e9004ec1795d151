"""The round view's tree figure: every drafted node drawn once, the accepted path apart, the bonus marked."""
from nanospec_core.metrics import TreeView
from nanospec_core.views.tree_plot import layout, tree_figure

# root -> a(0) -> c(2) -> e(4); root -> b(1) -> d(3); accepted a, c; bonus 99
TREE = TreeView(tokens=[10, 11, 12, 13, 14], parents=[-1, -1, 0, 1, 2], scores=[-0.1, -0.9, -0.3, -1.5, -0.8],
                path=[0, 2], bonus=99)


def test_layout_puts_children_one_level_deeper_and_keeps_subtrees_apart():
    depth, y = layout(TREE.parents)
    assert depth == [1, 1, 2, 2, 3]
    assert y[4] == y[2] == y[0] and y[3] == y[1] and y[0] != y[1]  # single-child chains stay level


def test_figure_draws_each_node_once_with_the_path_highlighted():
    fig = tree_figure(TREE, decode=lambda t: f"t{t}")
    by_name = {trace.name: trace for trace in fig.data if trace.name}
    assert list(by_name["accepted"].text) == ["t10", "t12"]
    assert sorted(by_name["rejected"].text) == ["t11", "t13", "t14"]
    assert by_name["bonus (target)"].text[-1] == "t99" and by_name["bonus (target)"].x[-1] == 3
    hover = by_name["accepted"].hovertext[1]
    assert "draft p = 0.819" in hover and "path p = 0.741" in hover  # exp(-0.3 + 0.1), exp(-0.3)


def test_an_empty_tree_still_draws_the_root_and_the_bonus():
    fig = tree_figure(TreeView(bonus=5), decode=str)
    names = {trace.name for trace in fig.data if trace.name}
    assert {"root (last committed)", "bonus (target)"} <= names
