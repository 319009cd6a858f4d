"""The printable status matrix: one self-contained HTML page in Vietnamese (pure).

Agencies are rows, categories columns; each cell says its status in words and in colour (the
words alone suffice on a black-and-white printer). With the period, the calendar version, the
moment of the status and of printing, and a legend, it is the page an archivist attaches to the
periodic report the regulation asks for (QĐ 18/2017/QĐ-UBND Điều 13.1; QĐ 1342/2023 Điều 10).
Every text from the database is escaped; the page loads nothing (inline CSS, no scripts).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from html import escape
from typing import Final

from formats.categories import CATEGORIES
from formats.vntime import VN_TZ
from gateway.compliance import STATUSES, Cell, Report, month_bounds

#: The label each status is printed with.
LABELS: Final[Mapping[str, str]] = {
    "on-time": "Đúng hạn",
    "late": "Trễ {n} ngày làm việc",
    "corrected": "Đã đính chính",
    "rejected-only": "Chỉ có bản bị từ chối",
    "missing": "Chưa gửi",
    "not-due-yet": "Chưa đến hạn",
}
_MEANING: Final[Mapping[str, str]] = {
    "on-time": "Đã gửi và được chấp nhận trong hạn.",
    "late": "Được chấp nhận sau hạn; N là số ngày làm việc sau ngày đến hạn.",
    "corrected": "Bản sau (cập nhật, thay thế) thay cho bản đầu; đúng hay trễ hạn tính theo "
    "bản đầu.",
    "rejected-only": "Mọi bản gửi đều bị từ chối: coi như chưa gửi.",
    "missing": "Đã quá hạn mà chưa có bản nào được chấp nhận.",
    "not-due-yet": "Chưa có bản được chấp nhận; chưa đến hạn.",
}
_COLOURS: Final[Mapping[str, tuple[str, str]]] = {  # background, border
    "on-time": ("#d9f2d9", "#3c8d3c"),
    "late": ("#ffe8b0", "#b7791f"),
    "corrected": ("#dbe7fb", "#3b6fc4"),
    "rejected-only": ("#f8d3cb", "#c0392b"),
    "missing": ("#f2b8b8", "#a61b1b"),
    "not-due-yet": ("#eeeeee", "#888888"),
}
#: The note beside the status of a cell whose report in force came before its period could be
#: complete (``Cell.early``): a flag, not a status, and not counted apart.
EARLY_NOTE: Final = "gửi trước khi hết kỳ: chưa thể có số liệu những ngày cuối kỳ"
_EARLY_MEANING: Final = (
    "Ghi chú bên cạnh tình trạng, không phải một tình trạng riêng: báo cáo đang có hiệu lực "
    "được gửi trước khi kỳ số liệu kết thúc (QĐ 18/2017/QĐ-UBND Điều 8.4.a: “mốc số liệu từ "
    "ngày 16 tháng trước đến ngày 15 tháng tiếp theo”), nên chưa thể có số liệu những ngày "
    "cuối kỳ. Đúng hay trễ hạn vẫn tính như trên; bản cập nhật hoặc thay thế gửi sau khi hết "
    "kỳ thì không còn ghi chú này."
)
_CSS: Final = """
@page { size: A4 landscape; margin: 12mm; }
* { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body { font-family: "Times New Roman", "Noto Serif", serif; font-size: 11pt; color: #000;
       margin: 0 auto; max-width: 290mm; }
h1 { font-size: 15pt; text-align: center; margin: 0 0 2mm; text-transform: uppercase; }
p.sub { text-align: center; margin: 0 0 4mm; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0 4mm; margin: 0 0 4mm; }
dl.meta dt { font-weight: bold; } dl.meta dd { margin: 0; }
table { border-collapse: collapse; width: 100%; page-break-inside: auto; }
tr { page-break-inside: avoid; } thead { display: table-header-group; }
th, td { border: 1px solid #444; padding: 1mm 1.5mm; vertical-align: top; font-size: 9pt; }
th { background: #f3f3f3; } th.agency { text-align: left; min-width: 45mm; }
small { color: #333; } td.none { color: #777; text-align: center; }
div.cell { border-left: 3mm solid; padding: 0.5mm 1mm; margin: 0.5mm 0; }
ul.legend { list-style: none; padding: 0; columns: 2; }
ul.legend li { margin: 1mm 0; break-inside: avoid; }
footer { margin-top: 8mm; display: flex; justify-content: space-between; }
footer div { text-align: center; width: 70mm; }
""" + "".join(
    f"div.{s} {{ background: {bg}; border-color: {border}; }}\n"
    for s, (bg, border) in _COLOURS.items()
)


def label(cell: Cell) -> str:
    """The Vietnamese label of ``cell`` (plain text, not escaped)."""
    text = LABELS[cell.status].format(n=cell.late_days)
    if cell.status == "corrected" and cell.late_days:
        text += f" (bản đầu trễ {cell.late_days} ngày làm việc)"
    if cell.early:
        text += f" ({EARLY_NOTE})"
    if cell.withdrawn:
        text += " (đã thu hồi)"
    if cell.paper:
        text += " (nhận bằng văn bản giấy)"
    if cell.ignored:
        text += (
            f" (bỏ qua bản đính chính {', '.join(cell.ignored)}: không nêu báo cáo nào đang có "
            "hiệu lực)"
        )
    return text


def _when(at: datetime) -> str:
    return f"{at.astimezone(VN_TZ):%H:%M ngày %d/%m/%Y} (UTC+7)"


def _cell_html(cell: Cell, monthly_label: str) -> str:
    detail = f"hạn {cell.due:%d/%m/%Y}"
    if cell.period.label != monthly_label:
        detail = f"kỳ {cell.period.label}, " + detail
    if cell.document_id:
        detail += f"<br>{escape(cell.document_id)}"
    return (
        f'<div class="cell {cell.status}"><b>{escape(label(cell))}</b><br>'
        f"<small>{detail}</small></div>"
    )


def _monthly(label: str) -> str:
    first, last = month_bounds(label)
    start = (first - timedelta(days=1)).replace(day=16)
    return f"{start:%d/%m/%Y} – {last.replace(day=15):%d/%m/%Y}"


Row = tuple[str, Mapping[str, Sequence[Cell]]]  # the row's heading (HTML), cells by category


def _table(heading: str, rows: Sequence[Row], monthly_label: Callable[[int], str]) -> str:
    """``rows`` × categories; ``monthly_label(i)`` is row i's month (YYYY-MM)."""
    categories = sorted(
        {c for _, cells in rows for c in cells}, key=lambda c: (c not in CATEGORIES, c)
    )
    if not categories:
        return "<p>Không có nghĩa vụ nào có kỳ kết thúc trong thời gian này.</p>"
    head = "".join(
        f"<th>{escape(CATEGORIES[c].title_vi if c in CATEGORIES else c)}<br>"
        f"<small>{escape(c)}</small></th>"
        for c in categories
    )
    body = []
    for i, (row_head, cells) in enumerate(rows):
        tds = "".join(
            "<td>" + "".join(_cell_html(x, monthly_label(i)) for x in cells[c]) + "</td>"
            if cells.get(c)
            else '<td class="none">—</td>'
            for c in categories
        )
        body.append(f'<tr><th class="agency">{row_head}</th>{tds}</tr>')
    return (
        f'<table><thead><tr><th class="agency">{heading}</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _page(
    title: str, sub: str, meta: Sequence[tuple[str, str]], table: str, counts: Mapping[str, int]
) -> str:
    legend = "".join(
        f'<li><div class="cell {s}"><b>{escape(LABELS[s].format(n="N"))}</b> '
        f"({counts[s]}): {escape(_MEANING[s])}</div></li>"
        for s in STATUSES
    )
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in meta)
    return f"""<!DOCTYPE html>
<html lang="vi">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<p class="sub">{sub}</p>
<dl class="meta">{rows}</dl>
{table}
<h2>Chú giải</h2>
<ul class="legend">{legend}<li>({escape(EARLY_NOTE)}): {escape(_EARLY_MEANING)}</li>
<li>—: không có nghĩa vụ cung cấp loại thông tin này.</li></ul>
<footer><div>Người lập biểu<br><br><br><br>(Ký, ghi rõ họ tên)</div>
<div>Thủ trưởng cơ quan<br><br><br><br>(Ký, ghi rõ họ tên, đóng dấu)</div></footer>
</body>
</html>
"""


def _meta(at: datetime, generated: datetime, version: str, n: int) -> list[tuple[str, str]]:
    return [
        ("Tình trạng tính đến", _when(at)),
        ("Lập lúc", _when(generated)),
        (
            "Lịch ngày làm việc",
            f"{escape(version)} (hạn tính theo ngày làm việc, kết thúc lúc 24:00 ngày đến hạn)",
        ),
        ("Số nghĩa vụ", str(n)),
    ]


def _by_category(cells: Iterable[Cell]) -> dict[str, list[Cell]]:
    out: defaultdict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        out[cell.obligation.category].append(cell)
    return out


def render(report: Report, names: Mapping[str, str], *, generated: datetime) -> str:
    """The matrix of ``report``: agencies × categories. ``names``: OrganId → Vietnamese name."""
    by_provider: defaultdict[str, list[Cell]] = defaultdict(list)
    for cell in report.cells:
        by_provider[cell.obligation.provider].append(cell)
    providers = sorted(by_provider, key=lambda p: (names.get(p, p), p))
    rows = [
        (
            f"{escape(names.get(p, '(không có trong danh bạ)'))}<br><small>{escape(p)}</small>",
            _by_category(by_provider[p]),
        )
        for p in providers
    ]
    month = f"{month_bounds(report.period)[0]:%m/%Y}"
    sub = (
        f"Kỳ số liệu tháng {month}: {_monthly(report.period)} (QĐ 18/2017/QĐ-UBND Điều 8.4.a), "
        f"và các kỳ sáu tháng, hằng năm kết thúc trong tháng {month}"
    )
    return _page(
        f"Tình hình cung cấp thông tin định kỳ — tháng {month}",
        sub,
        _meta(report.at, generated, report.calendar_version, len(report.cells)),
        _table("Cơ quan cung cấp", rows, lambda _: report.period),
        report.counts(),
    )


def render_history(
    organ_id: str, name: str, reports: Sequence[Report], *, generated: datetime
) -> str:
    """One agency's months (rows) × categories."""
    rows = [(escape(f"{month_bounds(r.period)[0]:%m/%Y}"), _by_category(r.cells)) for r in reports]
    counts: dict[str, int] = {s: sum(r.counts()[s] for r in reports) for s in STATUSES}
    first, last = reports[0], reports[-1]
    return _page(
        f"Tình hình cung cấp thông tin — {name}",
        f"{escape(name)} ({escape(organ_id)}): các kỳ kết thúc từ tháng "
        f"{month_bounds(first.period)[0]:%m/%Y} đến tháng {month_bounds(last.period)[0]:%m/%Y}",
        _meta(last.at, generated, last.calendar_version, sum(len(r.cells) for r in reports)),
        _table("Tháng", rows, lambda i: reports[i].period),
        counts,
    )
