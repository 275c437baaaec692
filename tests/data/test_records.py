"""Record readers: JSONL and text files, located errors, skipping and counting."""

import json

import pytest

from data import records


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def test_jsonl_and_txt(tmp_path):
  a = _write(tmp_path / "a.jsonl", ['{"text": "first"}', "", '{"text": "second", "id": 2}'])
  _write(tmp_path / "b.jsonl", ['{"body": "third"}'])
  t = _write(tmp_path / "c.txt", ["line one", "", "line two", "line three"])
  assert list(records.iter_text_records(a)) == ["first", "second"]
  assert list(records.iter_text_records(str(tmp_path / "b.jsonl"), text_field="body")) == [
      "third"]
  assert list(records.iter_text_records(t)) == ["line one", "line two", "line three"]
  assert list(records.iter_text_records(t, txt_blocks=True)) == [
      "line one", "line two\nline three"]
  assert list(records.iter_txt(t, blocks=True)) == [(1, "line one"),
                                                    (3, "line two\nline three")]
  # Comma-separated globs, each expanded in sorted order, files read once.
  assert list(records.iter_text_records(f"{tmp_path}/a*.jsonl, {t},{a}")) == [
      "first", "second", "line one", "line two", "line three"]


def test_no_match_names_the_pattern(tmp_path):
  _write(tmp_path / "a.jsonl", ['{"text": "x"}'])
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    list(records.iter_text_records(f"{tmp_path}/a.jsonl,{tmp_path}/nothing-here*.jsonl"))
  with pytest.raises(FileNotFoundError):
    records.expand_patterns(" , ")


def test_unsupported_extension(tmp_path):
  path = _write(tmp_path / "a.csv", ["text"])
  with pytest.raises(ValueError, match="a.csv: unsupported"):
    list(records.iter_text_records(path))


@pytest.mark.parametrize("line, reason, words", [
    ('{"text": "unterminated', "bad_json", "invalid JSON"),
    ('["text"]', "not_object", "expected a JSON object, got list"),
    ('{"title": "no text"}', "missing_field", "missing field 'text'"),
    ('{"text": 42}', "wrong_type", "must be a string, got int"),
    ('{"text": "   "}', "empty", "is empty"),
])
def test_malformed_record_is_located(tmp_path, line, reason, words):
  path = _write(tmp_path / "bad.jsonl", ['{"text": "ok"}', "", line, '{"text": "after"}'])
  with pytest.raises(records.RecordError) as info:
    list(records.iter_text_records(path))
  assert str(info.value).startswith(f"{path}:3: ")
  assert words in str(info.value)
  assert (info.value.path, info.value.line_no, info.value.reason) == (path, 3, reason)
  assert isinstance(info.value, ValueError)


def test_skip_invalid_counts(tmp_path):
  path = _write(tmp_path / "mixed.jsonl", [
      '{"text": "one"}', "{bad", '[1]', '{"text": "two"}', '{"other": 1}', '{"text": null}',
      '{"text": ""}', "{worse", '{"text": "three"}'])
  counter = records.SkipCounter()
  texts = list(records.iter_text_records(path, skip_invalid=True, counter=counter))
  assert texts == ["one", "two", "three"]
  assert counter.skipped == 6
  assert dict(counter.reasons) == {"bad_json": 2, "not_object": 1, "missing_field": 1,
                                   "wrong_type": 1, "empty": 1}


def test_jsonl_hook_for_other_formats(tmp_path):
  rows = [{"prompt": "What is 2 plus 3?", "answer": "5"}, {"prompt": "Hi"}, {"answer": "1"}]
  path = _write(tmp_path / "rl.jsonl", [json.dumps(r) for r in rows])

  def validate(obj):
    return records.require_text(obj, "prompt"), obj.get("answer")

  assert list(records.iter_jsonl(path)) == [(1, rows[0]), (2, rows[1]), (3, rows[2])]
  counter = records.SkipCounter()
  assert list(records.iter_jsonl_records(path, validate, skip_invalid=True,
                                         counter=counter)) == [
      ("What is 2 plus 3?", "5"), ("Hi", None)]
  assert dict(counter.reasons) == {"missing_field": 1}
  with pytest.raises(records.RecordError, match=r"rl.jsonl:3: missing field 'prompt'"):
    list(records.iter_jsonl_records(path, validate))


def test_bytes_that_are_not_utf8_are_a_located_record_error(tmp_path):
  path = tmp_path / "latin.jsonl"
  path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "after"}\n')
  with pytest.raises(records.RecordError) as info:
    list(records.iter_text_records(str(path)))
  assert str(info.value) == (f"{path}:2: not valid UTF-8 (byte 0xe9 at byte 14 of the line)")
  assert info.value.reason == "bad_utf8"
  counter = records.SkipCounter()
  assert list(records.iter_text_records(str(path), skip_invalid=True, counter=counter)) == [
      "ok", "after"]
  assert dict(counter.reasons) == {"bad_utf8": 1}


def test_txt_lines_that_are_not_utf8(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_bytes(b"line one\n\nline \xff two\nline three\n\nline four\n")
  with pytest.raises(records.RecordError, match=r"notes\.txt:3: not valid UTF-8"):
    list(records.iter_text_records(str(path)))
  counter = records.SkipCounter()
  assert list(records.iter_text_records(str(path), skip_invalid=True, counter=counter)) == [
      "line one", "line three", "line four"]
  # As blocks, the document holding the bad line is skipped whole, counted once.
  blocks = records.SkipCounter()
  assert list(records.iter_text_records(str(path), txt_blocks=True, skip_invalid=True,
                                        counter=blocks)) == ["line one", "line four"]
  assert (counter.skipped, blocks.skipped) == (1, 1)
  with pytest.raises(records.RecordError, match=r"notes\.txt:3: "):
    list(records.iter_txt(str(path), blocks=True))


def test_a_file_mostly_skipped_is_logged_with_its_share(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(records.logging, "warning",
                      lambda message, *args: warnings.append(message % args))
  few = _write(tmp_path / "few.jsonl", ['{"text": "t"}'] * 10 + ["{bad"])
  list(records.iter_text_records(few, skip_invalid=True))
  assert warnings == []  # 1 of 11 is under the 10% share
  many = _write(tmp_path / "many.jsonl", ['{"text": "t"}'] * 8 + ["{bad", "[1]"])
  list(records.iter_text_records(many, skip_invalid=True))
  assert warnings == [f"{many}: skipped 2 of 10 records (20%) {{'bad_json': 1, 'not_object': 1}}"]
