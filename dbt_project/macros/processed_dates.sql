{#
    The processed dates, from the vars `start_date` (inclusive) and `end_date` (exclusive).

    processed_date_range() returns none when no start_date is given (every date is processed),
    otherwise {'start': 'YYYY-MM-DD', 'end': 'YYYY-MM-DD'}; end_date defaults to start_date + 1 day.
#}
{% macro processed_date_range() -%}
    {%- set start_var = var('start_date', none) -%}
    {%- set end_var = var('end_date', none) -%}
    {%- if start_var is none or start_var | string | trim == '' -%}
        {%- if end_var is not none and end_var | string | trim != '' -%}
            {{ exceptions.raise_compiler_error(
                "end_date=" ~ end_var ~ " was given without start_date; pass both "
                ~ "(--vars '{start_date: YYYY-MM-DD, end_date: YYYY-MM-DD}') or neither."
            ) }}
        {%- endif -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set start = _parse_iso_date('start_date', start_var) -%}
    {%- if end_var is none or end_var | string | trim == '' -%}
        {%- set end = start + modules.datetime.timedelta(days=1) -%}
    {%- else -%}
        {%- set end = _parse_iso_date('end_date', end_var) -%}
    {%- endif -%}
    {%- if end <= start -%}
        {{ exceptions.raise_compiler_error(
            "end_date=" ~ end ~ " must be after start_date=" ~ start ~ " (end_date is exclusive)."
        ) }}
    {%- endif -%}
    {{ return({'start': start.isoformat(), 'end': end.isoformat()}) }}
{%- endmacro %}


{% macro _parse_iso_date(name, value) -%}
    {%- set text = value | string | trim -%}
    {%- set parsed = none -%}
    {%- if modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}', text) -%}
        {%- set parsed = modules.datetime.date.fromisoformat(text) -%}
    {%- endif -%}
    {%- if parsed is none -%}
        {{ exceptions.raise_compiler_error(
            "var " ~ name ~ "=" ~ value ~ " is not a date; use YYYY-MM-DD, e.g. 2024-01-31."
        ) }}
    {%- endif -%}
    {{ return(parsed) }}
{%- endmacro %}


{#
    SQL predicate selecting the processed dates of `column`; `true` when every date is processed.
#}
{% macro processed_dates_filter(column) -%}
    {%- set date_range = processed_date_range() -%}
    {%- if date_range is none -%}
        true
    {%- else -%}
        ({{ column }} >= date '{{ date_range.start }}' and {{ column }} < date '{{ date_range.end }}')
    {%- endif -%}
{%- endmacro %}


{#
    A full refresh rebuilds a model from scratch, so with a date range it would drop every date
    outside the range. Fail instead, naming the range. (Unit tests, which set their own vars,
    are not builds and pass.)
#}
{% macro forbid_full_refresh_with_date_range() -%}
    {%- set date_range = processed_date_range() -%}
    {%- if execute and flags.FULL_REFRESH and model.resource_type == 'model'
        and date_range is not none -%}
        {{ exceptions.raise_compiler_error(
            "--full-refresh rebuilds every date of " ~ this ~ "; run it without the vars "
            ~ "start_date/end_date (given: " ~ date_range.start ~ " to " ~ date_range.end ~ ")."
        ) }}
    {%- endif -%}
{%- endmacro %}
