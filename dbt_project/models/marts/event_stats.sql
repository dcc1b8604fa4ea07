{#
    Events per (date, user). Incremental delete+insert on the date partition: every date in
    [var start_date, var end_date) is replaced whole, including dates that became empty in raw
    (meta.replace_where, see macros/delete_insert_replace_where.sql); other dates are not touched.
    Without vars every date is processed, so the table is made equal to raw.events.
#}
{%- set date_range = processed_date_range() -%}
{%- if execute and date_range is not none and flags.FULL_REFRESH -%}
    {{ exceptions.raise_compiler_error(
        "--full-refresh rebuilds every date of analytics.event_stats; run it without the vars "
        ~ "start_date/end_date (given: " ~ date_range.start ~ " to " ~ date_range.end ~ ")."
    ) }}
{%- endif -%}
{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='event_date',
        on_schema_change='fail',
        meta={'replace_where': processed_dates_filter('event_date')},
    )
}}

with events as (

    select * from {{ ref('stg_events__events') }}
    where {{ processed_dates_filter('event_date') }}

),

final as (

    select
        event_date,
        user_id,
        count(*) as event_count
    from events
    group by event_date, user_id

)

select * from final
