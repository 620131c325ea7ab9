import pytest

from ovss_cli.errors import UsageError
from ovss_cli.vocabulary import Vocabulary, load_vocabulary, parse_class_lines, parse_class_list, read_class_file


def test_comma_list_strips_spaces():
    v = parse_class_list(" cat, sofa ,window")
    assert v.names == ["cat", "sofa", "window"]
    assert v.prompt_names == v.names
    assert v.name_to_class == [0, 1, 2]


@pytest.mark.parametrize("text", ["", "cat,,sofa", "cat, ,sofa", "   ", "cat,"])
def test_empty_or_whitespace_entries_are_errors(text):
    with pytest.raises(UsageError) as err:
        parse_class_list(text)
    assert "empty" in str(err.value)


@pytest.mark.parametrize("text", ["cat,sofa,cat", "cat,Cat", "cat, cat "])
def test_duplicates_are_errors(text):
    with pytest.raises(UsageError, match="(?i)duplicate class name 'cat'"):
        parse_class_list(text)


@pytest.mark.parametrize("text, shown", [("sofa bed,sofa  bed", "sofa  bed"), ("caf\u00e9,cafe\u0301", "cafe\u0301"),
                                         ("STRASSE,stra\u00dfe", "stra\u00dfe"), ("\uff43at,cat", "cat")])
def test_names_that_differ_only_in_spacing_unicode_form_or_case_are_duplicates(text, shown):
    """CLIP's tokenizer sees these pairs as the same name: two classes would tie everywhere."""
    with pytest.raises(UsageError, match=f"duplicate class name '{shown}'"):
        parse_class_list(text)


def test_file_with_synonyms(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\ncat: kitty, kitten\n\nsofa\nwindow: windowpane\n")
    v = read_class_file(f)
    assert v.names == ["cat", "sofa", "window"]
    assert v.prompt_names == ["cat", "kitty", "kitten", "sofa", "window", "windowpane"]
    assert v.name_to_class == [0, 0, 0, 1, 2, 2]


def test_synonym_clashing_with_another_class(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("cat: kitty\nkitty\n")
    with pytest.raises(UsageError, match=r"c.txt: duplicate class name 'kitty'"):
        read_class_file(f)


@pytest.mark.parametrize("line", ["cat: , kitty", ": kitty", "cat: kitty,"])
def test_empty_names_in_file(line):
    with pytest.raises(UsageError, match=r"<classes>:1"):
        parse_class_lines([line])


def test_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n# nothing\n")
    with pytest.raises(UsageError, match="no classes found"):
        read_class_file(f)


def test_missing_file_and_both_options(tmp_path):
    with pytest.raises(UsageError, match="classes file not found"):
        load_vocabulary(None, tmp_path / "nope.txt")
    with pytest.raises(UsageError, match="either --classes or --classes-file"):
        load_vocabulary("cat", tmp_path / "x.txt")
    with pytest.raises(UsageError, match="no vocabulary"):
        load_vocabulary(None, None)


def test_benchmark_names_kept_whole():
    v = Vocabulary.from_names(["road, route", "window "])
    assert v.prompt_names == ["road, route", "window "]


def test_benchmark_vocabulary_whole_and_split():
    names = ["road, route", "window ", "person, individual, someone", "road"]
    whole = Vocabulary.for_benchmark(names, "whole")
    assert whole.prompt_names == names and whole.name_to_class == [0, 1, 2, 3]
    split = Vocabulary.for_benchmark(names, "split")
    assert split.names == ["road", "window", "person", "road"]
    assert split.prompt_names == ["road", "route", "window", "person", "individual", "someone", "road"]
    assert split.name_to_class == [0, 0, 1, 2, 2, 2, 3]
    with pytest.raises(UsageError, match="unknown --synonyms"):
        Vocabulary.for_benchmark(names, "both")
