{#
    For every processed date, the audited stats (not yet published) add up to the raw events of
    that date: the sum of event_count equals the number of rows in raw.events. A date present on
    one side only fails too. Respects the vars start_date/end_date; without them every date is
    checked.
#}

with raw_counts as (

    select
        event_date,
        count(*) as raw_events
    from {{ ref('stg_events__events') }}
    where {{ processed_dates_filter('event_date') }}
    group by event_date

),

stats_counts as (

    select
        event_date,
        sum(event_count) as counted_events
    from {{ ref('int_event_stats__audit') }}
    where {{ processed_dates_filter('event_date') }}
    group by event_date

),

final as (

    select
        coalesce(raw_counts.event_date, stats_counts.event_date) as event_date,
        coalesce(raw_counts.raw_events, 0) as raw_events,
        coalesce(stats_counts.counted_events, 0) as counted_events
    from raw_counts
    full outer join stats_counts
        on raw_counts.event_date = stats_counts.event_date
    where coalesce(raw_counts.raw_events, 0) != coalesce(stats_counts.counted_events, 0)

)

select * from final
