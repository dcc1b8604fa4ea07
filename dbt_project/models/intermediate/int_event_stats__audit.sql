{#
    The new stats of the processed dates, before they are published: events per (date, user) of
    [var start_date, var end_date) (every date without vars), as the table
    audit.event_stats__<start>_<end> (macros/audit.sql). The data tests run on it; event_stats
    publishes it only when they pass, then drops it.
#}
{{
    config(
        materialized='table',
        alias=event_stats_audit_alias(),
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
