"""Markdown tables from the benchmark's JSON results; docs page update."""

import re

START = "<!-- benchmark:start -->"
END = "<!-- benchmark:end -->"


def _ms(seconds: float | None) -> str:
  return "" if seconds is None else f"{1e3 * seconds:.1f}"


def _ratio(summary: dict | None) -> str:
  if not summary or "ratio_median" not in summary:
    return ""
  return (f"{summary['ratio_median']:.2f}x "
          f"({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f})")


def _mb(value: dict | None) -> str:
  if not value:
    return ""
  if "error" in value:
    return "error"
  text = f"{value['call_peak_mb']:.1f}"
  if "xla_plan_mb" in value:
    text += f", plan {value['xla_plan_mb']:.1f}"
  return text


def _config_table(name: str, entry: dict) -> list[str]:
  c = entry["config"]
  lines = [
      f"**{name}**: batch {c['batch']}, time {c['time']}, units {c['units']},"
      f" features {c['features']}", "",
      "| variant | fwd+bwd ms (median / min) | fwd+bwd vs floor | "
      "inference ms (median / min) | inference vs floor | memory MB |",
      "|---|---:|---:|---:|---:|---:|"]
  for variant, v in entry["variants"].items():
    if "unavailable" in v:
      lines.append(f"| {variant} | not available: {v['unavailable']} |"
                   " | | | |")
      continue
    train, infer = v.get("train"), v.get("infer")
    cells = [variant]
    for s in (train, infer):
      cells += [f"{_ms(s['median_s'])} / {_ms(s['min_s'])}" if s else "",
                _ratio(s)]
    cells.append(_mb(v.get("memory")))
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def _sweep_table(sweep: dict) -> list[str]:
  c = sweep["config"]
  names = list(sweep["variants"])
  lines = [
      f"**Sweep over time** (batch {c['batch']}, units {c['units']}): "
      "forward+backward µs per step (median); memory MB in parentheses", "",
      "| time | " + " | ".join(names) + " |",
      "|---:|" + "---:|" * len(names)]
  for i, length in enumerate(sweep["times"]):
    cells = [str(length)]
    for name in names:
      v = sweep["variants"][name]
      cell = f"{v['per_step_us'][i]:.0f}"
      if v["memory"]:
        cell += f" ({_mb(v['memory'][i])})"
      cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  rows = [("time exponent", lambda v: f"{v['time_exponent']:.2f}"),
          ("MB per step", lambda v: (f"{v['memory_mb_per_step']:.3f}"
                                     if "memory_mb_per_step" in v else "")),
          ("first call s (max)", lambda v: f"{max(v['first_call_s']):.1f}")]
  for label, fn in rows:
    lines.append(f"| {label} | " + " | ".join(
        fn(sweep["variants"][n]) for n in names) + " |")
  return lines + [""]


def markdown(results: dict) -> str:
  """The benchmarks page's table: configs, sweep, entry overhead, method."""
  m = results["machine"]
  processes = results["options"].get("processes", 1)
  repeats = results["options"]["repeats"]
  ratios = ("paired per-round ratios to the hand-written `tf.while_loop` + "
            "`TensorArray` loop (lower is faster)")
  if processes > 1:
    rounds = (f"{processes} fresh processes of {repeats} interleaved rounds "
              f"after warm-up each; 'vs floor' is the median of all {ratios}"
              ", in parentheses the range of the per-process medians. ")
  else:
    rounds = (f"{repeats} interleaved rounds after warm-up; 'vs floor' is "
              f"the median (min-max) of {ratios}. ")
  lines = [
      f"Measured on {m['cpu']} ({m['cpu_count']} cores), GPU: {m['gpus']}; "
      f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, {m['date']}. "
      + rounds +
      "All loop variants step the same `keras.layers.LSTMCell`, except the "
      "`_gru` rows (a `GRUCell`) and the `_model` rows (an LSTM written as "
      "a functional step model), whose ratios are to their own hand-written "
      "loop (`while_loop_gru`, `while_loop_model`). The `matmul_skeleton` "
      "rows are a lower bound for any loop that runs the cell step by step: "
      "its five matmuls per step alone, no gates; `recurrent_skeleton` is "
      "the bound once the input half is hoisted: three matmuls per step.",
      ""]
  for name, entry in results["configs"].items():
    lines += _config_table(name, entry)
  if "sweep" in results:
    lines += _sweep_table(results["sweep"])
  e = results["entry_overhead"]
  lines += [
      f"Eager entry overhead of `model_rnn` (validation, adaptation, set-up;"
      f" one-step sequence minus the bare cell call): "
      f"{e['overhead_us']:.0f} µs. Traces for three (batch, time) shapes "
      "with `input_signature=[tf.TensorSpec([None, None, features])]`: "
      f"{e['traces_for_3_shapes_with_input_signature']}.", "",
      f"Memory: {results['memory_method']}.", ""]
  return "\n".join(lines)


def update_readme(path: str, table: str) -> None:
  """Replaces the text between the benchmark markers of `path`.

  Raises:
    ValueError: If the file lacks the markers.
  """
  with open(path) as f:
    text = f.read()
  pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
  if not pattern.search(text):
    raise ValueError(f"{path} has no {START} ... {END} markers.")
  text = pattern.sub(lambda _: f"{START}\n{table}\n{END}", text, count=1)
  with open(path, "w") as f:
    f.write(text)
