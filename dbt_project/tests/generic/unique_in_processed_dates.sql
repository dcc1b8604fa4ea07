{#
    Fails with every value of `column_name` that occurs more than once among the rows of the
    processed dates (vars start_date/end_date; every date without vars). A daily build then checks
    only its own partition, so its cost does not grow with the history. Uniqueness across dates
    is the loader's job (it refuses an event_id already stored under another date).
#}
{% test unique_in_processed_dates(model, column_name, date_column='event_date') %}

select
    {{ column_name }},
    count(*) as occurrences
from {{ model }}
where {{ processed_dates_filter(date_column) }}
group by {{ column_name }}
having count(*) > 1

{% endtest %}
