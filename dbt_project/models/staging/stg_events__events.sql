with source as (

    select * from {{ source('events', 'events') }}

),

renamed as (

    select
        cast(event_id as varchar) as event_id,
        cast(user_id as varchar) as user_id,
        cast(event_type as varchar) as event_type,
        cast(event_at as timestamp) as event_at,
        cast(event_date as date) as event_date,
        cast(load_id as varchar) as load_id
    from source

)

select * from renamed
