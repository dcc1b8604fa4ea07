{#
    Events per (date, user). Incremental delete+insert on the date partition: every date in
    [var start_date, var end_date) is replaced whole, including dates that became empty in raw
    (meta.replace_where, see macros/delete_insert_replace_where.sql); other dates are not touched.
    Without vars every date is processed, so the table is made equal to raw.events.
    The post-hook records the build in ops.build_log, in the publish's transaction
    (macros/build_log.sql).
#}
{{- forbid_full_refresh_with_date_range() }}
{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='event_date',
        on_schema_change='fail',
        meta={'replace_where': processed_dates_filter('event_date')},
        pre_hook="{{ remember_replaced_dates() }}",
        post_hook=[
            "{{ write_build_log() }}",
        ],
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
