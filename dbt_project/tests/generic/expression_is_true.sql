{#
    Fails with every row of the model for which `expression` is not true (null counts as failing).
#}
{% test expression_is_true(model, expression, column_name=none) %}

select *
from {{ model }}
where not coalesce(({{ expression }}), false)

{% endtest %}
